"""The dispatcher: model -> slot resolution, cold-boot waits, coalescing, proxying, decision records."""
