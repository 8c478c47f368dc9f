"""What a valid model name, tag, sleep level and policy value is: defined once,
for gRPC requests and the configuration file alike."""

import re

# \Z, not $: $ also matches before a final newline, which would let "qwen\n" through.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")
MODEL_NAME_RULE = "up to 128 letters, digits, '.', '_', ':', '/' or '-', starting with a letter or digit"
TAG_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
TAG_NAME_RULE = "1-64 letters, digits, '_', '.' or '-'"

MAX_LEVEL = 2  # sleep levels are 0 (quiesce only), 1 and 2
PRIORITY_MIN, PRIORITY_MAX = -(2 ** 31), 2 ** 31 - 1  # int32, as on the wire
