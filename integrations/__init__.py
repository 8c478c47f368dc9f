"""Engines on sleepd: one adapter per engine, registered through that engine's own plug-in mechanism."""
