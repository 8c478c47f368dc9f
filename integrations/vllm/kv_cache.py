"""A vLLM CPU worker's KV cache, allocated in sleepd regions tagged `kv_cache` from the start.

vLLM allocates the cache as one or a few raw int8 buffers (`torch.zeros`) and hands out
many views of them (per layer, per kernel block size), some kept where no one can reach
them afterwards. So the buffers are made in sleepd memory as vLLM asks for them, and no
view ever needs re-pointing. A cache tensor that vLLM binds outside those regions would
keep its memory outside sleepd: that is refused rather than left to double the cache.
"""

import contextlib


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


def _raw_buffer_size(args, kwargs) -> int | None:
    """The byte count of a `torch.zeros(n, dtype=torch.int8, device=cpu)` call, vLLM's raw cache
    buffer; None for any other call."""
    import torch

    if kwargs.get("dtype") is not torch.int8 or torch.device(kwargs.get("device", "cpu")).type != "cpu":
        return None
    if len(args) == 1 and isinstance(args[0], int):
        return args[0]
    return None


@contextlib.contextmanager
def allocated_in_sleepd(client):
    """Inside this block, vLLM's raw KV cache buffers are made in new sleepd regions; yields the
    list of those regions, filled as they are made."""
    from torch.overrides import TorchFunctionMode

    import torch

    regions = []

    class CacheInSleepd(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            size = _raw_buffer_size(args, kwargs) if func is torch.zeros else None
            if not size:
                return func(*args, **kwargs)
            region = client.alloc(size, "kv_cache")
            regions.append(region)
            return region.tensor(torch.int8, (size,)).zero_()

    with CacheInSleepd():
        yield regions


def check_in_sleepd(model_runner, regions) -> None:
    """Refuses a cache that vLLM bound outside `regions`: sleepd could neither free nor restore it."""
    spans = [(region.address, region.address + region.mapped_size) for region in regions]
    outside = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
               for tensor in cache_tensors(model_runner)
               if not any(start <= tensor.data_ptr() < end for start, end in spans)}
    if outside:
        from vllm import __version__

        raise RuntimeError(f"vLLM {__version__} keeps {sum(outside.values())} bytes of its KV cache in "
                           f"{len(outside)} buffer(s) that sleepd did not allocate (regions made: {len(regions)}); "
                           "sleepd cannot own that cache")
