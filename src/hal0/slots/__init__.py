"""Slots: one inference workload each (model, provider, port, lifecycle)."""
