"""What a llama-server load will cost, before it starts: weights, KV cache, compute buffers, process baseline.

A pure function of the GGUF layout and the slot's settings, so admission can ask it for any slot and model.
The formulas follow llama.cpp's own allocation (KV cells padded to 256 per stream; the compute buffer's size is
fitted on the CPU build's `sched_reserve` report, see docs/performance.md for the comparison).
"""

from __future__ import annotations

import functools
from dataclasses import field
from pathlib import Path
from typing import Any

from hal0.datatypes import datatype
from hal0.registry.gguf import GGUFLayout, read_gguf_layout

MIB = 1 << 20
# llama.cpp pads each KV stream to a multiple of 256 cells.
KV_PAD = 256
# What an idle CPU llama-server holds beyond its reported buffers (code, threadpool, vocabulary tables): its RSS
# minus its buffers at ctx 512 was 3-13 MiB for the generated models (bench/memory.py, CPU build, 2026-12).
DEFAULT_BASELINE_BYTES = 16 * MIB
# The tokenizer's own tables (token strings, merge and lookup maps) live on the heap, outside every buffer: RSS minus
# buffers grew by ~92 MiB from the 32k-token to the 600k-token generated model (CPU build, 2026-12), ~160 B a token.
VOCAB_BYTES_PER_TOKEN = 160
# What a GPU process holds on its device beyond the buffers llama-server reports: the CUDA context and its
# kernels. NVML's per-process figure minus the CUDA buffer report was 587.7-589.9 MiB in all 12 cases of
# bench/gpu_memory.py (H200, CUDA 13, models of 1.6-8.5 GB, full and partial offload; 2026-12-01).
GPU_CONTEXT_BYTES = 590 * MIB
# What the same GPU process holds in host memory beyond its host buffers: the CUDA runtime and the libraries it maps
# (cuBLAS, the ggml-cuda kernels). RSS of a fully offloaded 1.7 GB model's llama-server was 512 MiB against 154 MiB
# estimated for its host buffers and baseline (bench/gpu_admission.py, H200, CUDA 13, 2026-12-02).
GPU_HOST_RUNTIME_BYTES = 360 * MIB
# Bytes per element of the KV cache types `-ctk/-ctv` accept (block types: block bytes / block elements).
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}


@datatype(frozen=True)
class LoadSettings:
    """The parts of a slot's settings that decide memory; `from_args` reads them from llama-server arguments."""

    ctx_size: int = 0  # 0: the model's training context, as llama-server does
    parallel: int = 0  # 0: llama-server's auto (4 sequences sharing one unified cache)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    gpu_layers: int = 0  # layers offloaded to the GPU device; more than the block count also moves the output
    flash_attn: bool = True  # llama-server's `auto` turns it on wherever the backend supports it
    kv_unified: bool | None = None  # None: llama-server's default (unified only with auto parallel)
    n_ubatch: int = 512
    n_batch: int = 2048
    gpu_device: str = "GPU0"

    @classmethod
    def from_args(cls, ctx_size: int | None, args: tuple[str, ...] | list[str]) -> LoadSettings:
        opts: dict[str, Any] = {"ctx_size": ctx_size or 0}
        names = {
            "-c": "ctx_size", "--ctx-size": "ctx_size", "-np": "parallel", "--parallel": "parallel",
            "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k", "-ctv": "cache_type_v",
            "--cache-type-v": "cache_type_v", "-ngl": "gpu_layers", "--gpu-layers": "gpu_layers",
            "--n-gpu-layers": "gpu_layers", "-fa": "flash_attn", "--flash-attn": "flash_attn",
            "-ub": "n_ubatch", "--ubatch-size": "n_ubatch", "-b": "n_batch", "--batch-size": "n_batch",
        }
        i = 0
        while i < len(args):
            flag, value = args[i], args[i + 1] if i + 1 < len(args) else ""
            if "=" in flag and flag.startswith("--"):
                flag, value = flag.split("=", 1)
                i -= 1
            if flag == "--kv-unified" or flag == "-kvu":
                opts["kv_unified"] = True
                i += 1
                continue
            key = names.get(flag)
            if key is None:
                i += 1
                continue
            if key == "flash_attn":
                opts[key] = value not in ("off", "0", "false", "disabled")
            elif key in ("cache_type_k", "cache_type_v"):
                opts[key] = value.lower()
            elif key == "gpu_layers":
                opts[key] = 1 << 20 if value in ("all", "auto") else int(value)
            else:
                opts[key] = int(value)
            i += 2
        return cls(**opts)


@datatype(frozen=True)
class DevicePart:
    """Bytes on one device (`CPU` is host memory)."""

    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes

    def to_dict(self) -> dict[str, int]:
        return {"weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
                "compute_bytes": self.compute_bytes, "output_bytes": self.output_bytes,
                "total_bytes": self.total_bytes}


@datatype(frozen=True)
class MemoryEstimate:
    """All the memory a backend will hold: its buffers per device plus the process's own baseline."""

    devices: dict[str, DevicePart]
    baseline_bytes: int
    n_ctx: int  # KV cells in all (streams × cells per stream)
    n_ctx_seq: int
    parallel: int
    kv_unified: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def buffers_bytes(self) -> int:
        """What llama-server's own buffer report should add up to."""
        return sum(d.total_bytes for d in self.devices.values())

    @property
    def total_bytes(self) -> int:
        return self.buffers_bytes + self.baseline_bytes

    def part(self, kind: str) -> int:
        return sum(getattr(d, f"{kind}_bytes") for d in self.devices.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes, "buffers_bytes": self.buffers_bytes,
            "weights_bytes": self.part("weights"), "kv_bytes": self.part("kv"),
            "compute_bytes": self.part("compute"), "baseline_bytes": self.baseline_bytes,
            "devices": {name: d.to_dict() for name, d in self.devices.items()},
            "n_ctx": self.n_ctx, "n_ctx_seq": self.n_ctx_seq, "parallel": self.parallel,
            "kv_unified": self.kv_unified, "notes": list(self.notes),
        }


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _int(layout: GGUFLayout, key: str, default: int) -> int:
    v = layout.arch_value(key)
    return v if isinstance(v, int) else default


def _cache_bytes(cache_type: str) -> float:
    try:
        return CACHE_TYPE_BYTES[cache_type]
    except KeyError as exc:
        raise ValueError(f"unknown KV cache type {cache_type!r}") from exc


def estimate(layout: GGUFLayout, settings: LoadSettings,
             baseline_bytes: int = DEFAULT_BASELINE_BYTES) -> MemoryEstimate:
    """The memory llama-server will allocate for this model with these settings, per device."""
    notes: list[str] = []
    n_layer = _int(layout, "block_count", 0)
    n_embd = _int(layout, "embedding_length", 0)
    n_ff = _int(layout, "feed_forward_length", 4 * n_embd)
    n_head = _int(layout, "attention.head_count", 1)
    n_head_kv = _int(layout, "attention.head_count_kv", n_head)
    head_k = _int(layout, "attention.key_length", n_embd // max(n_head, 1))
    head_v = _int(layout, "attention.value_length", n_embd // max(n_head, 1))
    n_ctx_train = _int(layout, "context_length", 4096)
    window = _int(layout, "attention.sliding_window", 0)
    vocab_v = layout.arch_value("vocab_size")
    n_vocab = vocab_v if isinstance(vocab_v, int) else next(
        (t.shape[1] for t in layout.tensors if t.name == "token_embd.weight" and len(t.shape) > 1), 32000)

    auto_parallel = settings.parallel <= 0
    parallel = 4 if auto_parallel else settings.parallel
    unified = settings.kv_unified if settings.kv_unified is not None else auto_parallel
    ctx = settings.ctx_size or n_ctx_train
    if unified:
        n_ctx_seq = _pad(ctx, KV_PAD)
        n_ctx = n_ctx_seq
    else:
        n_ctx_seq = _pad(-(-ctx // parallel), KV_PAD)
        n_ctx = n_ctx_seq * parallel
    if window:
        notes.append("sliding-window layers counted at full context (an upper bound)")

    gpu_layers = max(0, min(settings.gpu_layers, n_layer + 1))
    first_gpu_layer = n_layer - min(gpu_layers, n_layer)
    gpu = settings.gpu_device
    weights = {"CPU": 0, gpu: 0}
    for t in layout.tensors:
        nbytes = _pad(t.nbytes, layout.alignment)
        layer = t.layer
        on_gpu = (layer is not None and layer >= first_gpu_layer) or (
            layer is None and t.name.startswith("output") and gpu_layers > n_layer)
        weights[gpu if on_gpu else "CPU"] += nbytes

    per_cell_layer = n_head_kv * (head_k * _cache_bytes(settings.cache_type_k)
                                  + head_v * _cache_bytes(settings.cache_type_v))
    gpu_kv_layers = n_layer - first_gpu_layer
    kv_gpu = int(n_ctx * gpu_kv_layers * per_cell_layer)
    kv_cpu = int(n_ctx * (n_layer - gpu_kv_layers) * per_cell_layer)

    ubatch = min(settings.n_ubatch, settings.n_batch, n_ctx)
    # Fitted on llama-server's sched_reserve report (CPU build): activations of one ubatch (3 FFN-wide and
    # 5 embedding-wide f32 rows live at once) plus the attention mask (f16 with flash attention); without flash
    # attention the f32 KQ matrix of every head joins it and the activations are reused more tightly.
    if settings.flash_attn:
        compute = ubatch * 4 * (3 * n_ff + 5 * n_embd + 10) + n_ctx_seq * ubatch * 2
    else:
        compute = ubatch * 4 * 7 * n_embd + n_ctx_seq * ubatch * 4 * (n_head + 1)
    output = n_vocab * 4 * parallel
    baseline_bytes += n_vocab * VOCAB_BYTES_PER_TOKEN
    devices = {"CPU": DevicePart(weights["CPU"], kv_cpu, 0, output)}
    if gpu_layers:
        # Fully offloaded, the host keeps only a small buffer for the input embeddings.
        devices[gpu] = DevicePart(weights[gpu], kv_gpu, compute, 0)
        devices["CPU"] = DevicePart(weights["CPU"], kv_cpu, ubatch * 4 * n_embd * 2, output)
        # Verified on a CUDA build (bench/gpu_memory.py): buffers within 1.6% of the report per case.
        baseline_bytes += GPU_CONTEXT_BYTES + GPU_HOST_RUNTIME_BYTES
        notes.append(f"includes {GPU_CONTEXT_BYTES // MIB} MiB for the GPU context and {GPU_HOST_RUNTIME_BYTES // MIB} "
                     "MiB of host memory for the GPU runtime (measured on CUDA)")
    else:
        devices["CPU"] = DevicePart(weights["CPU"], kv_cpu, compute, output)
    return MemoryEstimate(devices, baseline_bytes, n_ctx, n_ctx_seq, parallel, unified, tuple(notes))


def file_size_rule(file_bytes: int) -> int:
    """The usual rule of thumb this estimate replaces: file size times 1.2."""
    return int(file_bytes * 1.2)


@functools.lru_cache(maxsize=64)
def _layout(path: Path, mtime_ns: int, size: int) -> GGUFLayout:
    return read_gguf_layout(path)


@functools.lru_cache(maxsize=256)
def _estimate(path: Path, mtime_ns: int, size: int, settings: LoadSettings, baseline_bytes: int) -> MemoryEstimate:
    return estimate(_layout(path, mtime_ns, size), settings, baseline_bytes)


def estimate_file(model_path: Path, settings: LoadSettings,
                  baseline_bytes: int = DEFAULT_BASELINE_BYTES) -> MemoryEstimate:
    """`estimate` for a GGUF file, its header read once per (path, mtime, size) and the estimate made once per
    settings: admission, the slot's listing and every memory view ask again and again (~70 µs each on 2 cores),
    one of them on a cold request's way to its first token. The estimate is shared: read it, do not change it.
    Raises ValueError for a file that is not a readable GGUF."""
    st = model_path.stat()
    return _estimate(model_path, st.st_mtime_ns, st.st_size, settings, baseline_bytes)
