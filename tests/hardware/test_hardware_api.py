"""/api/hardware, /api/slots/{name}/estimate and each slot's `memory`, through a running hal0."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Hal0


def test_hardware_reports_host_memory_and_gpus(hal0: Hal0) -> None:
    hal0.start()
    body = hal0.client.get("/api/hardware").json()
    assert body["memory"]["total_bytes"] >= body["memory"]["available_bytes"] > 0
    assert isinstance(body["gpus"], list) and body["cpu"]["cores"] >= 1
    for gpu in body["gpus"]:
        assert {"index", "vendor", "name", "memory_total_bytes", "memory_used_bytes"} <= gpu.keys()


@pytest.mark.llama
def test_a_slot_shows_its_estimate_before_and_its_measured_memory_after_a_load(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    # Verbosity 4 is where llama-server prints its buffer report (hal0 does not start it so by default yet).
    hal0.write_slot_config("a", 'type = "chat"\nctx_size = 1024\nargs = ["-np", "1", "-lv", "4"]\n')
    hal0.start()
    r = hal0.client.get("/api/slots/a/estimate", params={"model": "tiny"})
    assert r.status_code == 200, r.text
    est = r.json()["estimate"]
    assert est["n_ctx"] == 1024 and est["total_bytes"] > est["weights_bytes"] > 0
    assert hal0.client.get("/api/slots/a/estimate").json()["error"]["code"] == "no_estimate"

    assert hal0.client.put("/api/slots/a/model", json={"model": "tiny"}).status_code == 200
    before = hal0.slot("a")["memory"]
    assert before["estimate"]["total_bytes"] == est["total_bytes"] and before["measured"] is None
    assert hal0.client.post("/api/slots/a/load").status_code == 200
    measured = hal0.client.get("/api/slots/a").json()["memory"]["measured"]
    assert measured["rss_bytes"] > 0 and measured["total_bytes"] > 0
    # llama-server's own report, read from the slot's log, agrees with the estimate.
    assert abs(measured["buffers_bytes"] - est["buffers_bytes"]) <= 0.10 * measured["buffers_bytes"]


def test_hal0_hardware_prints_every_memory_pool(hal0: Hal0) -> None:
    import subprocess
    import sys

    hal0.start()
    out = subprocess.run([sys.executable, "-m", "hal0.cli", "--url", hal0.url, "hardware"], env=hal0.env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines()[0].split() == ["DEVICE", "NAME", "TOTAL", "FREE", "BUDGET", "SLOTS", "NOTE"]
    assert out.splitlines()[1].startswith("host")


def test_an_apu_shows_its_vram_and_its_gtt_pool() -> None:
    from hal0.cli import hardware_rows

    rows = hardware_rows({"memory": {"total_bytes": 64 << 30, "available_bytes": 60 << 30}, "cpu": {"cores": 16},
                          "gpus": [{"index": 0, "vendor": "amd", "name": "Radeon 8060S", "memory_total_bytes": 1 << 29,
                                    "memory_used_bytes": 0, "gtt_total_bytes": 96 << 30, "gtt_used_bytes": 0}]})
    assert [r["note"] for r in rows] == ["", "VRAM", "GTT"]
    assert rows[2]["total"] == "96.0 GiB"
    rows = hardware_rows({"memory": {"total_bytes": 64 << 30, "available_bytes": 60 << 30}, "cpu": {"cores": 16},
                          "budgets": {"host": {"budget_bytes": 60 << 30}},
                          "holdings": [{"slot": "a", "bytes": {"host": 3 << 30}}]})
    assert (rows[0]["budget"], rows[0]["slots"]) == ("60.0 GiB", "3.0 GiB")
