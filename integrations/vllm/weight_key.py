"""The key of a vLLM rank's weight set: everything that decides the bytes, as one line.

No vLLM here (weight_sets.py gathers the parts). The key is a readable label (what
`sleepctl sets` shows) and a SHA-256 over the options and the checkpoint files' content
hashes. The options alone (everything but the content) have a digest of their own, under
which the last key is remembered for a checkpoint whose files are gone.
"""

import hashlib
import json
import re

# The plugin's own part of the bytes: raise it when what the plugin does to loaded weights changes
# (for example the CPU linear dispatch), so that sets committed by an older plugin are not joined.
FORMAT = 1
LABEL_MOST = 96


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def options_digest(options: dict) -> str:
    """A digest of everything but the checkpoint's content: which set to start from when the files are gone."""
    return hashlib.sha256(_canonical({"format": FORMAT, "options": options})).hexdigest()


def label(name: str, tp: tuple[int, int], pp: tuple[int, int]) -> str:
    """`vllm NAME tpR/N ppR/N`, NAME cut to what is plainly printable (it reaches terminals and logs)."""
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", name)[-LABEL_MOST:] or "_"
    return f"vllm {safe} tp{tp[0]}/{tp[1]} pp{pp[0]}/{pp[1]}"


def key(label_text: str, options: dict, files: dict[str, str]) -> str:
    """The key: `label sha256`, the digest over the options and {file name: content SHA-256}."""
    digest = hashlib.sha256(_canonical({"format": FORMAT, "options": options, "files": files})).hexdigest()
    return f"{label_text} {digest}"
