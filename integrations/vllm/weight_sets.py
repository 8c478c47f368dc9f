"""vLLM on weight sets (docs/vllm.md, "Restarts and shared weights"): a rank's loaded weights
are committed to the daemon as a weight set, and a later or second server with the same key
joins the set instead of reading the checkpoint.

The worker's `load_model` runs inside `serving(worker, own)`, which puts this rank's client
in reach of vLLM's `DefaultModelLoader.load_model`, replaced here by `_load_model`:

    meta model (no memory) -> key -> join_weights(key)
        found: every parameter and buffer over the set's memory, vLLM's post-processing run
               again under `weights_already_processed()` to rebuild its Python state
        none:  vLLM's own load, then `own(model)` (the platform's move into sleepd regions),
               then commit_weights

Joined weights are read-only. `write_step()` (SleepClient.leave_weights) runs before each of
vLLM's weight-writing entry points: the model's `load_weights`, the worker's `reload_weights`,
`start_weight_update` and `update_weights`.
"""

import contextlib
import logging
import os
import time

import grpc

from sleepd.client import SleepdError

from . import weight_key
from .checkpoint_hashes import CheckpointHashes
from .patching import run_within

log = logging.getLogger(f"vllm.{__name__}")

VARIABLE = "SLEEPD_WEIGHT_CACHE"
# Buffers this small (attention's quantisation scales) are copied out of the set, not mapped: vLLM's
# post-processing writes them again (set_default_quant_scales fills them in place), and a write to a
# set's memory faults.
PRIVATE_BUFFER_BYTES = 4096
# The entry points that write a loaded model's weights, on vLLM's worker (those a release lacks are skipped).
WRITING_WORKER_METHODS = ("reload_weights", "start_weight_update", "update_weights")


class _Serving:
    """This rank while its worker loads the model: its client, and how the platform moves loaded
    weights into sleepd regions (CPU: adopt)."""

    def __init__(self, worker, client, own):
        self.worker, self.client, self.own = worker, client, own


_serving: _Serving | None = None
_joined = None  # the WeightSet this process committed or joined (SleepClient.weight_sets.WeightSet)


def enabled() -> bool:
    if os.environ.get(VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        from vllm.model_executor.utils import weights_already_processed  # noqa: F401  (vLLM 0.32 on)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def serving(worker, client, own):
    """The worker's load_model runs inside: the loader joins or commits this rank's weight set."""
    global _serving
    load_format = worker.vllm_config.load_config.load_format
    if load_format == "ipc_cache":
        raise RuntimeError(f"SLEEPD_MODEL={os.environ.get('SLEEPD_MODEL')} with --load-format ipc_cache: vLLM's "
                           "weight-cache daemon would own the weights, which sleepd can neither sleep nor share; "
                           "drop --load-format ipc_cache (sleepd's weight sets restart and share servers; see "
                           "docs/vllm.md), or unset SLEEPD_MODEL")
    if not enabled():
        yield
        return
    _serving = _Serving(worker, client, own)
    try:
        yield
    finally:
        _serving = None


# ---- the key ----

def _sources(loader, model_config):
    """The weight source vLLM's DefaultModelLoader reads first (get_all_weights), from the model's class: the
    model is not built yet (building it twice would register its layers twice)."""
    from vllm.model_executor.model_loader.utils import get_model_architecture

    model_class, _ = get_model_architecture(model_config)
    return [type(loader).Source(model_config.model, model_config.revision, prefix="",
                                fall_back_to_pt=getattr(model_class, "fall_back_to_pt_during_load", True),
                                allow_patterns_overrides=getattr(model_class, "allow_patterns_overrides", None))]


def _checkpoint_files(loader, model_config) -> list[tuple[str, str]]:
    """[(name in the key, path)] of every weight file vLLM would read; raises where it finds none."""
    files = []
    for index, source in enumerate(_sources(loader, model_config)):
        folder, paths, _, _ = loader._prepare_weights(source.model_or_path, source.subfolder, source.revision,
                                                      source.fall_back_to_pt, source.allow_patterns_overrides)
        files += [(f"{index}:{os.path.relpath(path, folder)}", path) for path in sorted(paths)]
    return files


def _options(vllm_config, model_config) -> tuple[dict, str, tuple, tuple]:
    """(everything but the checkpoint's content that decides the bytes, the label's name, tp, pp)."""
    import hashlib

    import torch
    from vllm import __version__
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.platforms import current_platform

    tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    pp = (get_pp_group().rank_in_group, get_pp_group().world_size)
    load = vllm_config.load_config
    model = model_config.model
    where = os.path.realpath(model) if os.path.isdir(model) else model
    config_text = model_config.hf_config.to_json_string(use_diff=False)
    options = {
        "vllm": __version__, "torch": torch.__version__, "platform": current_platform.device_type,
        "model": where, "revision": model_config.revision,
        "hf_config": hashlib.sha256(config_text.encode()).hexdigest(),
        "dtype": str(model_config.dtype), "quantization": model_config.quantization,
        "max_model_len": model_config.max_model_len, "kv_cache_dtype": vllm_config.cache_config.cache_dtype,
        "load_format": str(load.load_format), "loader_extra": load.model_loader_extra_config,
        "ignore_patterns": load.ignore_patterns,
        "safetensors_load_strategy": getattr(load, "safetensors_load_strategy", None),
        "tp": list(tp), "pp": list(pp),
    }
    return options, os.path.basename(where.rstrip("/")) or where, tp, pp


def key_for(loader, vllm_config, model_config) -> tuple[str | None, str, bool]:
    """(key, options digest, whether the checkpoint's files were there). The key is None where the
    files are gone and no set was recorded for that path and options."""
    options, name, tp, pp = _options(vllm_config, model_config)
    digest = weight_key.options_digest(options)
    hashes = CheckpointHashes()
    try:
        files = _checkpoint_files(loader, model_config)
    except (RuntimeError, OSError, ValueError) as error:  # no weight files there (moved away, an emptied cache)
        log.debug("no checkpoint files for %s: %s", model_config.model, error)
        return hashes.last_key(digest), digest, False
    started = time.monotonic()
    contents = hashes.digests([path for _, path in files])
    if hashes.hashed:
        log.info("sleepd hashed %d checkpoint file(s) of %s in %.2f s (cached against their stat from now on)",
                 len(hashes.hashed), model_config.model, time.monotonic() - started)
    named = {name_in_key: contents[os.path.realpath(path)] for name_in_key, path in files}
    return weight_key.key(weight_key.label(name, tp, pp), options, named), digest, True


# ---- join ----

def _build_on_meta(vllm_config, model_config, prefix):
    import torch
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(model_config.dtype), torch.device("meta"):
        return initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)


def _slots(model):
    """(qualified name, module, leaf, tensor, is_parameter) for every parameter and buffer, aliases included."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for leaf, tensor in table.items():
                if tensor is not None:
                    yield (f"{module_name}.{leaf}" if module_name else leaf), module, leaf, tensor, is_parameter


def _point_at(model, joined) -> int:
    """Registers every tensor of the set's manifest in `model` over the set's memory (tied tensors stay
    one object; parameters keep their class and attributes, such as their weight loaders). Returns how
    many tensors were mapped."""
    import torch

    modules = dict(model.named_modules(remove_duplicate=False))
    views = joined.tensors()
    made = {}  # a place -> the object registered there, so that tied names stay one tensor
    for place in joined.places:
        module_name, _, leaf = place.name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise RuntimeError(f"the weight set names {place.name!r}, which this model does not have")
        where = (place.region, place.offset, place.shape, place.strides, place.dtype)
        old_parameter = module._parameters.get(leaf)
        is_buffer = leaf in module._buffers and old_parameter is None
        if where not in made:
            view = views[place.name]
            if is_buffer:
                nbytes = view.numel() * view.element_size()
                made[where] = view.clone() if nbytes <= PRIVATE_BUFFER_BYTES else view
            else:
                cls = type(old_parameter) if old_parameter is not None else torch.nn.Parameter
                parameter = torch.nn.Parameter._make_subclass(cls, view, False)
                if old_parameter is not None:
                    parameter.__dict__.update(old_parameter.__dict__)  # weight_loader, output_dim, ...
                made[where] = parameter
        tensor = made[where]
        if is_buffer:
            module._buffers[leaf] = tensor if not isinstance(tensor, torch.nn.Parameter) else tensor.data
        else:
            module._buffers.pop(leaf, None)
            module._parameters[leaf] = tensor if isinstance(tensor, torch.nn.Parameter) else \
                torch.nn.Parameter(tensor, requires_grad=False)
    return len(made)


def _left_on_meta(model, device) -> list[str]:
    """Names of the tensors still on the meta device, which the forward pass could not read. Empty tensor
    attributes (an attention layer's KV-cache placeholder, bound later) are made on `device` instead."""
    import torch

    names = [name for name, _, _, tensor, _ in _slots(model) if tensor.is_meta]
    for module_name, module in model.named_modules():
        for attribute, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                if value.numel() == 0:
                    setattr(module, attribute, torch.empty_like(value, device=device))
                else:
                    names.append(f"{module_name}.{attribute}" if module_name else attribute)
    return names


def _restore_device_for_reload(model, device) -> None:
    """vLLM's in-place reload (reload_weights) rebuilds each layer on the device recorded when the model
    was made: the meta device here. It is the target device."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    except ImportError:
        return
    for layer in model.modules():
        get_layerwise_info(layer).restore_device = device


def _join(loader, joined, model, vllm_config, model_config):
    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.utils import weights_already_processed
    from vllm.utils.torch_utils import set_default_torch_dtype

    device_config = vllm_config.device_config
    target = torch.device(device_config.device if loader.load_config.device is None else loader.load_config.device)
    mapped = _point_at(model, joined)
    with set_default_torch_dtype(model_config.dtype), weights_already_processed():
        process_weights_after_loading(model, model_config, target)  # Python state only: no tensor transforms
    left = _left_on_meta(model, target)
    if left:
        raise RuntimeError(f"joined weight set {joined.id} lacks {len(left)} tensor(s) this model reads "
                           f"({', '.join(left[:5])}); start once with {VARIABLE}=0, and report it")
    _restore_device_for_reload(model, target)
    return mapped


# ---- the loader ----

def _load_model(original):
    def load_model(loader, vllm_config, model_config, prefix: str = ""):
        serving_now = _serving
        if serving_now is None or model_config is not vllm_config.model_config:
            return original(loader, vllm_config, model_config, prefix)  # not a worker's model (a draft)
        global _joined
        client = serving_now.client
        started = time.monotonic()
        key, options, present = key_for(loader, vllm_config, model_config)
        hashes = CheckpointHashes()
        joined = client.join_weights(key) if key is not None else None
        if joined is not None:
            model = _build_on_meta(vllm_config, model_config, prefix)
            if not present:
                log.warning("%s's checkpoint files are gone: serving the weight set last committed for that "
                            "path and options (%s)", model_config.model, joined.id)
            mapped = _join(loader, joined, model, vllm_config, model_config)
            _joined = joined
            _guard_load_weights(model)
            hashes.remember_key(options, key)
            log.info("joined weight set %s (%d tensors in %d regions, %d bytes): no checkpoint read; weights "
                     "ready in %.2f s", joined.id, mapped, len(joined.regions),
                     sum(region.size for region in joined.regions), time.monotonic() - started)
            return model.eval()
        loaded = original(loader, vllm_config, model_config, prefix)
        if not present:
            return loaded  # vLLM found the files after all (it downloaded them): no key to commit under
        if getattr(loaded, "secondary_weights", None):
            log.info("%s reads weight files besides its checkpoint's (secondary weights), which the key does not "
                     "cover: its weights are not committed as a weight set", model_config.model)
            return loaded
        regions = serving_now.own(loaded)
        tensors = {name: tensor for name, _, _, tensor, _ in _slots(loaded)}
        try:
            _joined = client.commit_weights(regions, key, tensors)
        except SleepdError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # Another server of the same weights committed while this one loaded: this one keeps its own.
            log.info("another server committed weight set %s meanwhile: this server keeps its own weights", key)
            return loaded
        _guard_load_weights(loaded)
        hashes.remember_key(options, key)
        log.info("committed the loaded weights as weight set %s (%d tensors, %d bytes); a restart or a second "
                 "server of the same weights joins it; weights ready in %.2f s", _joined.id, len(tensors),
                 sum(region.size for region in regions), time.monotonic() - started)
        return loaded
    return load_model


# ---- the write step ----

def write_step() -> None:
    """Before vLLM writes this rank's weights: a joined set's memory becomes this rank's own copy, at the
    same addresses. Nothing to do where it left already (a level-2 sleep) or never joined."""
    global _joined
    joined = _joined
    if joined is None or not joined.joined:
        return
    from . import session

    started = time.monotonic()
    session.allocator().client.leave_weights(joined)
    _joined = None
    log.info("left weight set %s before a weight update: this server's weights are its own copy now (%.2f s)",
             joined.id, time.monotonic() - started)


def _guard_load_weights(model) -> None:
    """The model's load_weights (what RL frameworks call through collective_rpc, and what vLLM's loaders
    and reload call) takes the write step first."""
    original = model.load_weights

    def load_weights(*args, **kwargs):
        write_step()
        return original(*args, **kwargs)

    model.load_weights = load_weights


@contextlib.contextmanager
def _writing(worker):
    write_step()
    yield


def install() -> None:
    """Hooks vLLM's file loader and its weight-writing worker methods (the worker's load_model is wrapped
    by the platform's module, with serving())."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.v1.worker.gpu_worker import Worker

    DefaultModelLoader.load_model = _load_model(DefaultModelLoader.load_model)
    for name in WRITING_WORKER_METHODS:
        if callable(getattr(Worker, name, None)):
            run_within(Worker, name, _writing)
