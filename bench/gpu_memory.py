"""The memory estimate on a GPU machine: NVML inventory, per-process GPU memory, estimate vs CUDA buffer report.

`python3 bench/gpu_memory.py --llama-server /path/to/cuda/llama-server --out results.json [--sizes 1 4 8]`
with hal0's src on PYTHONPATH. Needs only python3, numpy and the NVIDIA driver: the models (~1-8 GB of F16 zeros,
written as sparse files) come from a GGUF writer here, since the gguf package may not be installed there.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import tempfile
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hal0

try:
    import hal0.registry
except ImportError:
    # hal0.registry's package imports need platformdirs and aiohttp; the GGUF reader inside needs neither.
    _pkg = types.ModuleType("hal0.registry")
    _pkg.__path__ = [str(Path(hal0.__file__).parent / "registry")]
    sys.modules["hal0.registry"] = _pkg

from hal0.hardware.estimate import LoadSettings, estimate, file_size_rule
from hal0.hardware.inventory import read_inventory
from hal0.hardware.probe import probe_llama_server
from hal0.registry.gguf import read_gguf_layout

MIB = 1 << 20
# (layers, width, heads, KV heads, FFN) of F16 llama-shaped models: about 1, 4 and 8 GB.
SHAPES: dict[int, tuple[int, int, int, int, int]] = {
    1: (16, 2048, 16, 4, 5632),
    4: (24, 3072, 24, 8, 8192),
    8: (24, 4096, 32, 8, 11008),
}
N_VOCAB = 32000
CASES = [
    ["-c", "4096", "-np", "1", "-ngl", "999"],
    ["-c", "32768", "-np", "4", "-ngl", "999"],
    ["-c", "16384", "-np", "8", "-ctk", "q8_0", "-ctv", "q8_0", "-ngl", "999"],
    ["-c", "8192", "-np", "1", "-ngl", "8"],
]


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, typ: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", typ) + payload


def write_model(path: Path, size_gb: int) -> Path:
    """A llama-architecture GGUF of F16 zeros (a sparse file: nothing but the header is written)."""
    n_layer, dim, n_head, n_kv, ff = SHAPES[size_gb]
    kv_dim = dim // n_head * n_kv
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(N_VOCAB - len(tokens))]
    types_ = [2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259)
    u32, f32, string, array, u8b = 4, 6, 8, 9, 7
    kvs = [
        _kv("general.architecture", string, _str("llama")),
        _kv("general.name", string, _str(f"hal0-gpu-{size_gb}g")),
        _kv("general.alignment", u32, struct.pack("<I", 32)),
        _kv("llama.context_length", u32, struct.pack("<I", 32768)),
        _kv("llama.embedding_length", u32, struct.pack("<I", dim)),
        _kv("llama.block_count", u32, struct.pack("<I", n_layer)),
        _kv("llama.feed_forward_length", u32, struct.pack("<I", ff)),
        _kv("llama.attention.head_count", u32, struct.pack("<I", n_head)),
        _kv("llama.attention.head_count_kv", u32, struct.pack("<I", n_kv)),
        _kv("llama.rope.dimension_count", u32, struct.pack("<I", dim // n_head)),
        _kv("llama.attention.layer_norm_rms_epsilon", f32, struct.pack("<f", 1e-5)),
        _kv("llama.vocab_size", u32, struct.pack("<I", N_VOCAB)),
        _kv("tokenizer.ggml.model", string, _str("llama")),
        _kv("tokenizer.ggml.tokens", array, struct.pack("<IQ", string, N_VOCAB) + b"".join(_str(t) for t in tokens)),
        _kv("tokenizer.ggml.scores", array, struct.pack("<IQ", f32, N_VOCAB) + struct.pack(f"<{N_VOCAB}f",
                                                                                             *([0.0] * N_VOCAB))),
        _kv("tokenizer.ggml.token_type", array, struct.pack("<IQ", 5, N_VOCAB) + struct.pack(f"<{N_VOCAB}i",
                                                                                               *types_)),
        _kv("tokenizer.ggml.unknown_token_id", u32, struct.pack("<I", 0)),
        _kv("tokenizer.ggml.bos_token_id", u32, struct.pack("<I", 1)),
        _kv("tokenizer.ggml.eos_token_id", u32, struct.pack("<I", 2)),
        _kv("tokenizer.ggml.add_bos_token", u8b, struct.pack("<?", True)),
    ]
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (dim, N_VOCAB))]
    for i in range(n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.attn_q.weight", (dim, dim)),
                   (f"blk.{i}.attn_k.weight", (dim, kv_dim)), (f"blk.{i}.attn_v.weight", (dim, kv_dim)),
                   (f"blk.{i}.attn_output.weight", (dim, dim)), (f"blk.{i}.ffn_norm.weight", (dim,)),
                   (f"blk.{i}.ffn_gate.weight", (dim, ff)), (f"blk.{i}.ffn_up.weight", (dim, ff)),
                   (f"blk.{i}.ffn_down.weight", (ff, dim))]
    shapes += [("output_norm.weight", (dim,)), ("output.weight", (dim, N_VOCAB))]
    infos, offset, sizes = [], 0, []
    for name, shape in shapes:
        typ = 0 if len(shape) == 1 else 1  # norms f32, matrices f16
        n = 1
        for d in shape:
            n *= d
        nbytes = n * (4 if typ == 0 else 2)
        infos.append(_str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
                     + struct.pack("<IQ", typ, offset))
        sizes.append((offset, nbytes, typ))
        offset += (nbytes + 31) // 32 * 32
    header = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(kvs)) + b"".join(kvs) + b"".join(infos)
    header += b"\0" * (-len(header) % 32)
    with path.open("wb") as fh:
        fh.write(header)
        # Norm gains of one (f32), everything else zeros: a sparse file llama.cpp maps like any other.
        for off, nbytes, typ in sizes:
            if typ == 0:
                fh.seek(len(header) + off)
                fh.write(struct.pack("<f", 1.0) * (nbytes // 4))
        fh.truncate(len(header) + offset)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(binary: str, sizes: list[int], work: Path) -> dict[str, Any]:
    inv = read_inventory()
    out: dict[str, Any] = {"inventory": inv.to_dict(), "cases": []}
    print(json.dumps(out["inventory"], indent=1), flush=True)
    for size in sizes:
        model = write_model(work / f"gpu-{size}g.gguf", size)
        layout = read_gguf_layout(model)
        for args in CASES:
            settings = LoadSettings.from_args(None, args)
            # llama.cpp names the first CUDA device CUDA0; the estimate takes the device name it will report.
            settings = LoadSettings(**{**asdict(settings), "gpu_device": "CUDA0"})
            est = estimate(layout, settings)
            case: dict[str, Any] = {"model_gb": size, "file_bytes": model.stat().st_size, "args": args,
                                    "estimate": est.to_dict(), "rule_1_2": file_size_rule(model.stat().st_size)}
            try:
                rep = probe_llama_server(binary, model, args, _port(), work / "server.log", timeout_s=300)
            except (RuntimeError, TimeoutError) as exc:
                case["error"] = str(exc)[-2000:]
                out["cases"].append(case)
                print(f"{size} GB {' '.join(args)}: {exc}", flush=True)
                continue
            reported = sum(sum(k.values()) for k in rep.buffers.values())
            case.update(reported=rep.buffers, reported_total=reported,
                        rss_bytes=rep.process.rss_bytes if rep.process else None,
                        nvml_process_bytes=rep.gpu_process_bytes,
                        memory_breakdown=[ln for ln in rep.log.splitlines() if "memory_breakdown" in ln][-6:])
            out["cases"].append(case)
            dev = {d: round(sum(k.values()) / MIB, 1) for d, k in rep.buffers.items()}
            estd = {d: round(p.total_bytes / MIB, 1) for d, p in est.devices.items()}
            print(f"{size} GB {' '.join(args)}: reported {dev} MiB, estimate {estd} MiB, "
                  f"total ratio {est.buffers_bytes / reported:.3f}, NVML process {rep.gpu_process_bytes}",
                  flush=True)
        model.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llama-server", required=True, help="a CUDA build of llama-server")
    parser.add_argument("--out", required=True, type=Path, help="where to write the results (JSON)")
    parser.add_argument("--sizes", nargs="+", type=int, default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--workdir", type=Path, default=None, help="where the models go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hal0-gpu-memory-", dir=args.workdir) as tmp:
        result = run(args.llama_server, args.sizes, Path(tmp))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
