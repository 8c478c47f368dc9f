"""Pieces both the daemon and its clients need: sizes, paths, the fd-socket wire format."""
