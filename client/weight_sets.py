"""Weight sets as an engine sees them (docs/client-api.md): the regions of a set,
read-only, and its manifest, which says where each tensor lies, so that an engine
that joins can build its tensors over the set's memory without loading anything.

    regions = c.adopt(model)                       # or loaded straight into c.alloc() regions
    c.commit_weights(regions, key, dict(model.state_dict()))
    ...
    joined = c.join_weights(key)                   # in a later or second engine
    tensors = joined.tensors()                     # {name: tensor over the set's memory}
"""

import json
from dataclasses import dataclass

from .region import Region


@dataclass(frozen=True)
class TensorPlace:
    """Where one tensor lies: region (its index in the set), byte offset, and its layout."""
    name: str
    region: int
    offset: int
    shape: tuple[int, ...]
    dtype: str  # as torch names it, without "torch.": "float16"
    strides: tuple[int, ...]  # in elements, as torch counts them


def encode(places: list[TensorPlace]) -> bytes:
    return json.dumps([[p.name, p.region, p.offset, list(p.shape), p.dtype, list(p.strides)] for p in places],
                      separators=(",", ":")).encode()


def decode(manifest: bytes) -> list[TensorPlace]:
    if not manifest:
        return []
    return [TensorPlace(name, region, offset, tuple(shape), dtype, tuple(strides))
            for name, region, offset, shape, dtype, strides in json.loads(manifest)]


def places_of(tensors: dict, regions: list[Region]) -> list[TensorPlace]:
    """Each tensor's place in `regions`, found by its address (or given as a TensorPlace); a tensor
    outside them is refused by name."""
    places = []
    for name, tensor in tensors.items():
        if isinstance(tensor, TensorPlace):
            if not 0 <= tensor.region < len(regions):
                raise ValueError(f"tensor {name!r} is placed in region {tensor.region} of {len(regions)}")
            places.append(tensor)
            continue
        start = tensor.data_ptr()
        for index, region in enumerate(regions):
            if region.address <= start < region.address + region.size:
                places.append(TensorPlace(name, index, start - region.address, tuple(tensor.shape),
                                          str(tensor.dtype).removeprefix("torch."), tuple(tensor.stride())))
                break
        else:
            raise ValueError(f"tensor {name!r} does not lie in the regions being committed")
    return places


def key_bytes(key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class WeightSet:
    """A weight set this engine has joined (or committed): its id, its key, this engine's regions of
    it in the set's order (read-only while joined), and where each tensor lies."""

    def __init__(self, set_id: str, key: bytes, regions: list[Region], places: list[TensorPlace]):
        self.id, self.key, self.regions, self.places = set_id, key, regions, places

    def __repr__(self) -> str:
        return f"WeightSet(id={self.id!r}, regions={len(self.regions)}, tensors={len(self.places)})"

    @property
    def joined(self) -> bool:
        """Still this engine's shared memory: False once it left (SleepClient.leave_weights, a level-2 sleep)."""
        return all(region.weight_set == self.id for region in self.regions)

    def tensors(self) -> dict:
        """{name: tensor} over the set's memory, as the manifest places them: views, no copies."""
        import torch

        result = {}
        for place in self.places:
            dtype = getattr(torch, place.dtype)
            region = self.regions[place.region]
            extent = 1 + sum((size - 1) * stride for size, stride in zip(place.shape, place.strides)) \
                if all(place.shape) else 0
            flat = region.tensor(dtype, (extent,), place.offset)
            result[place.name] = flat.as_strided(place.shape, place.strides)
        return result
