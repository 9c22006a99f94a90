"""The machine's hardware and what a backend costs on it: inventory, estimate before load, measured after.

Admission calls `estimate(layout, LoadSettings)` and `measure(pid, log)`; the API shows `inventory()`.
"""

from hal0.hardware.estimate import DevicePart, LoadSettings, MemoryEstimate, estimate, file_size_rule
from hal0.hardware.inventory import Gpu, HostMemory, Inventory, inventory, read_inventory
from hal0.hardware.measure import MeasuredMemory, ProcessMemory, measure, parse_buffer_report

__all__ = [
    "DevicePart", "Gpu", "HostMemory", "Inventory", "LoadSettings", "MeasuredMemory", "MemoryEstimate",
    "ProcessMemory", "estimate", "file_size_rule", "inventory", "measure", "parse_buffer_report", "read_inventory",
]
