"""bench.report reads each part's latest run, never a copy of an earlier round kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

from bench import report


def _write(folder: Path, name: str, bench: str | None, p50_ms: float) -> None:
    record = {"when": "2026-12-07 06:00:00", "machine": {"cores": 2},
              "results": {"c1": {"hal0": {"p50_ms": p50_ms, "p50_added_ms": p50_ms - 1.0}}}}
    if bench is not None:
        record["bench"] = bench
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_the_latest_run_is_the_parts_own_file(tmp_path: Path) -> None:
    _write(tmp_path, "proxy", "proxy", 1.41)
    # Copies of earlier rounds carry the same `bench` and sort after the part's own file.
    _write(tmp_path, "proxy_batch0_r6", "proxy", 2.22)
    _write(tmp_path, "proxy_r6", "proxy", 3.33)
    _write(tmp_path, "gpu_memory", None, 4.44)

    res = report.load(tmp_path)

    assert sorted(res) == ["proxy"]
    assert res["proxy"]["results"]["c1"]["hal0"]["p50_ms"] == 1.41
    row = report.table(res).splitlines()[2]
    assert row.startswith("| small request c=1: p50 (added) ms | n/a | 1.41 (+0.41) |"), row


def test_a_part_with_only_round_copies_is_absent(tmp_path: Path) -> None:
    _write(tmp_path, "restart_r13_1", "restart", 200.0)
    _write(tmp_path, "restart_stream_r13_1", "restart_stream", 210.0)

    assert report.load(tmp_path) == {}
