"""The estimate against llama-server's own buffer report, with a real llama-server and generated models whose
shapes were not the ones the compute-buffer formula was fitted on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hal0.hardware.estimate import LoadSettings, estimate
from hal0.hardware.probe import probe_llama_server
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.gguf import read_gguf_layout
from tests.conftest import free_port

# Grouped-query attention (6 query heads, 2 KV heads), an FFN not a multiple of the width, 32k training context.
GQA = replace(TINY, n_layers=3, dim=384, n_heads=6, n_kv_heads=2, ffn_dim=1000, context=32768,
              filler_vocab=3000, name="hal0-gqa-random")

CASES = [
    ["-c", "512", "-np", "1"],
    ["-c", "4096", "-np", "4", "-ctk", "q8_0", "-ctv", "q8_0"],
    ["-c", "32768", "-np", "8"],
    ["-c", "16384", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0"],
    [],  # llama-server's defaults: training context, auto parallel with a unified cache
]


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_gguf(tmp_path_factory.mktemp("gqa") / "gqa.gguf", GQA)


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "defaults")
def test_the_estimate_is_within_ten_percent_of_what_llama_server_allocates(
        llama_server: str, gqa_model: Path, tmp_path: Path, args: list[str]) -> None:
    report = probe_llama_server(llama_server, gqa_model, args, free_port(), tmp_path / "server.log")
    got = report.buffers["CPU"]
    est = estimate(read_gguf_layout(gqa_model), LoadSettings.from_args(None, args))
    reported = sum(got.values())
    assert abs(est.buffers_bytes - reported) <= 0.10 * reported, (est.to_dict(), got)
    # Weights and KV follow from the file and llama.cpp's padding exactly; only the compute buffer is a fit.
    assert abs(est.part("weights") - got["weights"]) <= 0.01 * got["weights"] + 0.01 * (1 << 20)
    assert abs(est.part("kv") - got["kv"]) <= 0.01 * got["kv"] + 0.01 * (1 << 20)
    assert report.process is not None and report.process.rss_bytes > 0
