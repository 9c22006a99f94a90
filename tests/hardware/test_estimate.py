"""The estimate as a pure function of the GGUF layout and the slot's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal0.hardware.estimate import LoadSettings, estimate, estimate_file
from hal0.registry.gguf import read_gguf_layout

# TINY: 2 layers, width 64, 4 heads of 16, 4 KV heads, 2048 training context.
KV_PER_CELL_F16 = 2 * 4 * (16 + 16) * 2


def test_kv_cells_follow_llama_cpps_streams_and_padding(model_files: dict[str, Path]) -> None:
    layout = read_gguf_layout(model_files["tiny"])
    one = estimate(layout, LoadSettings(ctx_size=1000, parallel=1))
    assert (one.n_ctx, one.n_ctx_seq) == (1024, 1024)  # padded to 256
    assert one.part("kv") == 1024 * KV_PER_CELL_F16
    split = estimate(layout, LoadSettings(ctx_size=1000, parallel=8))
    assert (split.n_ctx_seq, split.n_ctx) == (256, 2048)  # ceil(1000 / 8) padded, per stream
    auto = estimate(layout, LoadSettings())
    assert (auto.parallel, auto.kv_unified, auto.n_ctx) == (4, True, 2048)  # the training context, one stream
    q8 = estimate(layout, LoadSettings(ctx_size=1024, parallel=1, cache_type_k="q8_0", cache_type_v="q8_0"))
    assert q8.part("kv") == 1024 * 2 * 4 * 32 * 34 // 32


def test_weights_are_the_tensor_table_and_offloaded_layers_move_to_the_gpu(model_files: dict[str, Path]) -> None:
    layout = read_gguf_layout(model_files["tiny"])
    cpu = estimate(layout, LoadSettings(ctx_size=512, parallel=1))
    assert cpu.part("weights") == sum((t.nbytes + 31) // 32 * 32 for t in layout.tensors)
    assert set(cpu.devices) == {"CPU"}
    half = estimate(layout, LoadSettings(ctx_size=512, parallel=1, gpu_layers=1, gpu_device="CUDA0"))
    assert set(half.devices) == {"CPU", "CUDA0"}
    assert half.part("weights") == cpu.part("weights")
    assert half.devices["CUDA0"].kv_bytes == half.devices["CPU"].kv_bytes == cpu.part("kv") // 2
    assert half.total_bytes == half.buffers_bytes + half.baseline_bytes


def test_estimate_file_reads_the_header_once(model_files: dict[str, Path]) -> None:
    a = estimate_file(model_files["tiny"], LoadSettings(ctx_size=512))
    assert a == estimate_file(model_files["tiny"], LoadSettings(ctx_size=512))
    assert a.to_dict()["total_bytes"] == a.total_bytes


def test_an_estimate_is_made_once_per_file_and_settings_and_again_for_a_replaced_file(
        model_files: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(model_files["tiny"].read_bytes())
    first = estimate_file(model, LoadSettings(ctx_size=512))
    assert estimate_file(model, LoadSettings(ctx_size=512)) is first
    assert estimate_file(model, LoadSettings(ctx_size=1024)).n_ctx > first.n_ctx
    # Another model under the same name (a re-import, a finished pull): estimated from its own header.
    model.write_bytes(model_files["tiny"].read_bytes() + b"\0" * 4096)
    assert estimate_file(model, LoadSettings(ctx_size=512)) is not first
    model.write_bytes(b"not a gguf")
    with pytest.raises(ValueError):
        estimate_file(model, LoadSettings(ctx_size=512))
