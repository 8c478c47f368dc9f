"""What happens to each tag when a model sleeps.

Level 0 quiesces only. Level 1 offloads `weights` and discards `kv_cache`.
Level 2 discards both. A tag with no rule is offloaded at every level: nothing
is discarded that nobody declared discardable.
"""

from enum import Enum

from sleepd.common.limits import MAX_LEVEL

from .errors import invalid


class Action(str, Enum):
    OFFLOAD = "offload"
    DISCARD = "discard"


DEFAULT_RULES: dict[int, dict[str, Action]] = {
    1: {"weights": Action.OFFLOAD, "kv_cache": Action.DISCARD},
    2: {"weights": Action.DISCARD, "kv_cache": Action.DISCARD},
}


class SleepRules:
    """Per-level tag rules; configurable, with the brief's defaults."""

    def __init__(self, rules: dict[int, dict[str, Action]] | None = None):
        self._rules = {level: dict(tags) for level, tags in (rules or DEFAULT_RULES).items()}

    def action(self, level: int, tag: str) -> Action:
        return self._rules.get(level, {}).get(tag, Action.OFFLOAD)

    def discardable(self, tag: str) -> bool:
        """Whether some level's rule discards the tag: only such a tag may be
        discarded instead of offloaded when the host pool is full."""
        return any(tags.get(tag) is Action.DISCARD for tags in self._rules.values())

    def plan(self, level: int, tags: set[str], explicit: dict[str, Action]) -> dict[str, Action] | None:
        """Action per tag for a sleep; None for level 0, which moves nothing.

        `tags` is every tag to act on; `explicit` overrides the level's rule for its tags.
        """
        if not 0 <= level <= MAX_LEVEL:
            raise invalid(f"sleep level {level} does not exist; use 0 (quiesce), 1 or 2")
        if level == 0 and not explicit:
            return None
        return {tag: explicit.get(tag) or self.action(level, tag) for tag in tags}


def parse_action(text: str) -> Action:
    try:
        return Action(text.lower())
    except ValueError:
        raise invalid(f"action {text!r} does not exist; use offload or discard") from None
