"""Pieces both the daemon and its clients need: sizes, paths, the handle-socket wire format."""
