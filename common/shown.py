"""Text that came from a client (an engine's error, a name, a tag), made safe to show
in a terminal or a log line: every character a terminal would act on or hide (C0
and C1 controls such as ESC, CR and LF, DEL, bidi overrides, zero-width and line
separators) is written as a visible escape (`\\x1b`, `\\n`, `\\u202e`), and the
whole is cut to a bound, with a marker saying how much was cut.

Backslashes stay as they are, so that showing shown text again changes nothing:
the daemon escapes what a client sent, and sleepctl escapes what the daemon sent.
"""

MAX_SHOWN = 400  # characters of one piece of client text
MAX_LINE = 2000  # characters of one line sleepctl prints from the daemon (several pieces and the daemon's words)
_MARKER_ROOM = 40  # the longest marker: "… (cut 1234567890123 more characters)"


def _escaped(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` with its control characters escaped, in at most `limit` characters."""
    if len(text) <= limit and text.isprintable():
        return text
    pieces, length, kept = [], 0, None
    for char in text:  # stops once past `limit`: a 3 MiB error costs what its first few hundred characters do
        pieces.append(_escaped(char))
        length += len(pieces[-1])
        if kept is None and length > limit - _MARKER_ROOM:
            kept = len(pieces) - 1
        if length > limit:
            return "".join(pieces[:kept]) + f"… (cut {len(text) - kept} more characters)"
    return "".join(pieces)
