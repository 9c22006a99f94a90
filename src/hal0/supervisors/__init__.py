"""Supervisors: who keeps backend processes alive (hal0's embedded one, or systemd)."""
