"""Moving a vLLM CPU worker's KV cache into sleepd regions tagged `kv_cache`.

vLLM allocates the cache as one or a few raw buffers and hands out many views
of them (per layer, per kernel block size). Each buffer is copied into a region
and every tensor over it is pointed at the region with `set_`, so the views stay
the same objects wherever vLLM keeps them. A buffer still referenced after that
(by something that is not a Python tensor) would keep its memory outside sleepd:
that is refused rather than left to double the cache.
"""

import gc


def _tensors_in(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def cache_tensors(model_runner) -> list:
    """The cache tensors vLLM binds: the runner's list and each attention layer's."""
    found = list(_tensors_in(model_runner.kv_caches))
    for layer in model_runner.compilation_config.static_forward_context.values():
        found.extend(_tensors_in(getattr(layer, "kv_cache", None)))
    return found


def move_into_sleepd(model_runner, client) -> list:
    """Returns the regions that now hold the cache."""
    import torch

    buffers = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage() for tensor in cache_tensors(model_runner)}
    if not buffers:
        return []
    views = {pointer: [] for pointer in buffers}
    for candidate in gc.get_objects():
        # type(), not isinstance(): the latter asks deprecated module objects for __class__, and they warn.
        if issubclass(type(candidate), torch.Tensor) and candidate.device.type == "cpu":
            pointer = candidate.untyped_storage().data_ptr()
            if pointer in views:
                views[pointer].append(candidate)
    regions = []
    for pointer, old in buffers.items():
        region = client.alloc(old.nbytes(), "kv_cache")
        regions.append(region)
        new = region.tensor(torch.uint8, (old.nbytes(),))
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        for view in views.pop(pointer):
            view.set_(new.untyped_storage(), view.storage_offset(), view.size(), view.stride())
        # Our own `old` is one reference; any other keeps the buffer outside sleepd.
        holders = torch._C._storage_Use_Count(old._cdata) - 1
        if holders:
            raise RuntimeError(f"vLLM's KV cache buffer of {old.nbytes()} bytes is still held in {holders} place(s) "
                               "that are not Python tensors; sleepd cannot own it (this vLLM release keeps its "
                               "cache where sleepd does not look)")
    return regions
