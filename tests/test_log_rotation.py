"""Backend logs stay within their cap: copied to `.1` (older ones shift up), then cut, checked by a stat first."""

from __future__ import annotations

import json
from pathlib import Path

from hal0.supervisors.base import LOG_KEEP, LOG_MAX_BYTES, log_due, rotate_log
from hal0.supervisors.embedded import EmbeddedSupervisor


def test_a_log_is_due_only_past_its_cap(tmp_path: Path) -> None:
    log = tmp_path / "slot.log"
    assert not log_due(log, 10)
    log.write_bytes(b"x" * 10)
    assert not log_due(log, 10) and not rotate_log(log, 10)
    log.write_bytes(b"x" * 11)
    assert log_due(log, 10)


def test_rotation_keeps_the_newest_copies_and_empties_the_log(tmp_path: Path) -> None:
    log = tmp_path / "slot.log"
    for generation in range(LOG_KEEP + 2):
        log.write_bytes(str(generation).encode() * 20)
        assert rotate_log(log, 10)
        assert log.read_bytes() == b""
    newest = str(LOG_KEEP + 1).encode()
    assert (tmp_path / "slot.log.1").read_bytes() == newest * 20
    assert (tmp_path / "slot.log.2").read_bytes() == str(LOG_KEEP).encode() * 20
    assert not (tmp_path / f"slot.log.{LOG_KEEP + 1}").exists()


async def test_the_embedded_supervisor_trims_a_log_past_its_cap(tmp_path: Path) -> None:
    supervisor = EmbeddedSupervisor(tmp_path / "state", tmp_path / "logs")
    log = supervisor.log_path("primary")
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x" * LOG_MAX_BYTES)
    await supervisor.trim_log("primary")
    assert log.stat().st_size == LOG_MAX_BYTES and not log.with_name("primary.log.1").exists()
    with log.open("ab") as fh:
        fh.write(b"one line more\n")
    await supervisor.trim_log("primary")
    assert log.stat().st_size == 0 and log.with_name("primary.log.1").stat().st_size == LOG_MAX_BYTES + 14


def test_the_decision_log_rotates_at_its_cap_counting_what_the_file_held_and_non_ascii_models(
        tmp_path: Path) -> None:
    """The log counts its size as it writes (no `tell` per request): a file that already held records counts,
    a model name outside ASCII is counted in the bytes the file gets, and every record lands in some file."""
    from hal0.dispatch.decisions import Decision, DecisionLog
    from hal0.events import EventBus

    path = tmp_path / "decisions.jsonl"
    path.write_text('{"request_id":"old"}\n' * 20)
    log = DecisionLog(path, EventBus(), max_bytes=2000, keep=3)
    assert len(log.recent) == 20
    for i in range(40):
        log.record(Decision(request_id=f"r{i}", endpoint="/v1/chat/completions", model="模型-é"))
    log.close()
    files = [path.with_name(f"decisions.jsonl.{i}") for i in (3, 2, 1)] + [path]  # oldest first
    assert all(f.exists() for f in files) and not path.with_name("decisions.jsonl.4").exists()
    line = len(path.read_bytes().splitlines()[-1]) + 1
    # Each file was cut at the first record that took it to the cap: none holds more than the cap and one record.
    assert all(f.stat().st_size < 2000 + line for f in files), [f.stat().st_size for f in files]
    ids = [json.loads(text)["request_id"] for f in files for text in f.read_text().splitlines()]
    kept = [r for r in ids if r != "old"]
    assert kept == [f"r{i}" for i in range(40 - len(kept), 40)]  # the newest records, in order, none lost between
