"""Backend logs stay within their cap: copied to `.1` (older ones shift up), then cut, checked by a stat first."""

from __future__ import annotations

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
