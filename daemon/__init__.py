"""The sleepd daemon: the control plane that owns every region's physical memory."""
