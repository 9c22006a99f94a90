"""Reading what a backend holds: llama-server's buffer report, /proc."""

from __future__ import annotations

import os

from hal0.hardware.estimate import LoadSettings
from hal0.hardware.measure import MIB, parse_buffer_report, read_process_memory

# Lines as the CPU build of llama-server prints them at -lv 4 (copied from a slot log).
CPU_LOG = """0.00.010.075 I srv    load_model: loading model 'old.gguf'
0.00.022.452 I load_tensors:   CPU_Mapped model buffer size =   999.00 MiB
0.00.010.075 I srv    load_model: loading model 'gqa.gguf'
0.00.022.452 I load_tensors:   CPU_Mapped model buffer size =     9.70 MiB
0.00.022.891 I llama_context:        CPU  output buffer size =     0.01 MiB
0.00.023.037 I llama_kv_cache:        CPU KV buffer size =     4.00 MiB
0.00.030.758 I sched_reserve:        CPU compute buffer size =     6.52 MiB
"""
# The shape of a CUDA build's report (host buffers are pinned CUDA_Host memory).
CUDA_LOG = """load_model: loading model 'm.gguf'
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:        CUDA0 model buffer size =  4403.49 MiB
llama_context:  CUDA_Host  output buffer size =     0.58 MiB
llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
sched_reserve:      CUDA0 compute buffer size =   304.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    16.01 MiB
"""


def test_the_last_load_of_a_log_is_read_per_device() -> None:
    got = parse_buffer_report(CPU_LOG)
    assert set(got) == {"CPU"}
    assert got["CPU"]["weights"] == round(9.70 * MIB)
    assert got["CPU"]["kv"] == 4 * MIB and got["CPU"]["compute"] == round(6.52 * MIB)


def test_gpu_buffers_are_split_from_host_buffers() -> None:
    got = parse_buffer_report(CUDA_LOG)
    assert set(got) == {"CPU", "CUDA0"}
    assert got["CUDA0"] == {"weights": round(4403.49 * MIB), "kv": 512 * MIB, "compute": 304 * MIB}
    assert got["CPU"]["compute"] == round(16.01 * MIB) and got["CPU"]["weights"] == round(281.81 * MIB)


def test_process_memory_of_a_live_process() -> None:
    mem = read_process_memory(os.getpid())
    assert mem is not None and mem.rss_bytes > 0
    assert read_process_memory(2**22 + 12345) is None


def test_slot_args_decide_the_load_settings() -> None:
    s = LoadSettings.from_args(8192, ["-np", "4", "-ctk", "q8_0", "--cache-type-v=q8_0", "-ngl", "99",
                                      "--flash-attn", "off", "-ub", "256"])
    assert (s.ctx_size, s.parallel, s.cache_type_k, s.cache_type_v) == (8192, 4, "q8_0", "q8_0")
    assert (s.gpu_layers, s.flash_attn, s.n_ubatch) == (99, False, 256)
    assert LoadSettings.from_args(None, []) == LoadSettings()
