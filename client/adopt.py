"""Moving a torch module's parameters and buffers into daemon-owned regions
(CPU tensors on the host backend, CUDA tensors on a GPU).

Tensors are packed into a few large regions (not one per tensor), each tensor
at an aligned offset, and the module is repointed at views of those regions.
Tied weights stay tied: a tensor shared by several modules is moved once.
A tensor that already lies in one of the client's regions (adopted before, or a
weight set's memory) stays where it is.
"""

# Offsets are aligned for vectorised kernels; packs stay large so a model has few handles.
ALIGNMENT = 256
PACK_BYTES = 256 << 20


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _slots(module):
    """(owning dict, name, tensor) for every parameter and buffer, in module order."""
    for submodule in module.modules():
        for table in (submodule._parameters, submodule._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    yield table, name, tensor


def _packs(tensors):
    """Groups unique tensors into packs of about PACK_BYTES: [(size, [(tensor, offset)])]."""
    packs, current, size = [], [], 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        offset = _align(size)
        if current and offset + nbytes > PACK_BYTES:
            packs.append((size, current))
            current, offset = [], 0
        current.append((tensor, offset))
        size = offset + nbytes
    if current:
        packs.append((size, current))
    return packs


def adopt(client, module, tag: str):
    import torch

    spans = [(region.address, region.address + region.mapped_size) for region in client.regions()]
    slots = [(table, name, tensor) for table, name, tensor in _slots(module)
             if not any(start <= tensor.data_ptr() < end for start, end in spans)]
    unique = list({id(tensor): tensor for _, _, tensor in slots}.values())
    moved, regions = {}, []
    try:
        for size, members in _packs(unique):
            region = client.alloc(max(size, 1), tag)
            regions.append(region)
            for tensor, offset in members:
                view = region.tensor(tensor.dtype, tensor.shape, offset)
                with torch.no_grad():
                    view.copy_(tensor)
                moved[id(tensor)] = view
    except BaseException:
        for region in regions:
            client.free(region)
        raise
    for table, name, tensor in slots:
        view = moved[id(tensor)]
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = view  # keeps the Parameter object, its grad flag and any optimizer references
        else:
            table[name] = view
    return regions
