#!/usr/bin/env bash
# Whether sleepd works on this GPU node, and how fast, with no network:
#     tests/gpu/accept.sh WHEELHOUSE OUTDIR
# tests/gpu/accept.py says what it does. It runs under the node's Python, the one
# that holds its CUDA build of torch: $PYTHON, else python3.
exec "${PYTHON:-python3}" "$(dirname "$0")/accept.py" "$@"
