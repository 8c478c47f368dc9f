"""vLLM's sleep-mode allocator interface (what `CuMemAllocator` offers a worker)
over one SleepClient: the daemon owns the memory, vLLM keeps its meaning.

vLLM names which tags to offload and discards the rest; here every tag this
rank holds is sent to the daemon with an explicit action, so the daemon's own
rules never decide what vLLM meant.
"""

import contextlib

# As in vLLM: a selective wake may leave only these asleep; any wake restores every other tag.
DEFERRABLE_TAGS = ("weights", "kv_cache")
DEFAULT_TAG = "default"


def _tags(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


class SleepdAllocator:
    def __init__(self, client):
        self.client = client

    def held_tags(self) -> set[str]:
        return {region.tag for region in self.client.regions()}

    def use_memory_pool(self, tag: str | None = None) -> contextlib.AbstractContextManager:
        """torch CUDA allocations inside land in sleepd regions tagged `tag` (GPU only)."""
        return self.client.pool(tag or DEFAULT_TAG)

    def sleep(self, offload_tags=None) -> None:
        """Offloads `offload_tags` (vLLM's default: the default tag) and discards every other tag."""
        offload = (DEFAULT_TAG,) if offload_tags is None else _tags(offload_tags)
        actions = {tag: "offload" if tag in offload else "discard" for tag in self.held_tags()}
        if actions:
            # The level is only what metrics and sleepctl report; the actions decide.
            level = 1 if "weights" in offload else 2
            self.client.sleep(level=level, tags=sorted(actions), actions=actions)

    def discard(self, tags) -> None:
        """Discards the mapped memory of `tags` without a backup."""
        named = sorted(set(_tags(tags)) & self.held_tags())
        if named:
            self.client.sleep(level=2, tags=named, actions={tag: "discard" for tag in named})

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restores `tags` (all if None), and always every tag that is not deferrable."""
        held = self.held_tags()
        wanted = held if tags is None else {t for t in held if t in tags or t not in DEFERRABLE_TAGS}
        if wanted:
            self.client.wake(tags=sorted(wanted))

    def cudagraph_pool(self):
        """vLLM asks for this only with sleep_mode_offload_cudagraph, which sleepd does not offer."""
        raise NotImplementedError("sleepd keeps CUDA graph memory pools outside its regions, so it cannot offload "
                                  "them: turn sleep_mode_offload_cudagraph off (see docs/vllm.md, known limits)")

    def held_bytes(self) -> int:
        """Device bytes this rank's regions hold now (mapped ones; asleep ones hold none)."""
        from sleepd.client.region import State

        return sum(region.mapped_size for region in self.client.regions() if region.state is State.MAPPED)

    def memory_info(self, total: int) -> tuple[int, int]:
        """(free, total) of a device of `total` bytes as this rank alone sees it: what other processes
        allocate or free meanwhile does not move it, so a sleep's change is this rank's own."""
        return total - self.held_bytes(), total

    def get_current_usage(self) -> int:
        """Bytes of every region this rank holds, asleep or awake (as CuMemAllocator counts)."""
        return sum(region.size for region in self.client.regions())
