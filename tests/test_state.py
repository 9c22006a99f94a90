"""The lifecycle table and state.json: every transition checked, and a file that is never half-written."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hal0.errors import IllegalTransition
from hal0.slots.state import TRANSITIONS, SlotState, check_transition, is_legal
from hal0.slots.store import SlotError, SlotRecord, StateStore

ALL = list(SlotState)
PAIRS = [(a, b) for a in ALL for b in ALL]
EXPECTED_LEGAL = {
    ("offline", "pulling"), ("offline", "starting"),
    ("pulling", "starting"), ("pulling", "offline"), ("pulling", "error"),
    ("starting", "warming"), ("starting", "unloading"), ("starting", "error"),
    ("warming", "ready"), ("warming", "unloading"), ("warming", "error"),
    ("ready", "serving"), ("ready", "idle"), ("ready", "unloading"), ("ready", "error"),
    ("serving", "ready"), ("serving", "unloading"), ("serving", "error"),
    ("idle", "serving"), ("idle", "unloading"), ("idle", "error"),
    ("unloading", "offline"), ("unloading", "error"),
    ("error", "offline"), ("error", "pulling"), ("error", "starting"),
}


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_every_transition_is_legal_exactly_when_the_table_says(src: SlotState, dst: SlotState) -> None:
    legal = (src.value, dst.value) in EXPECTED_LEGAL
    assert is_legal(src, dst) is legal
    if legal:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition(src, dst)
        assert info.value.detail["from"] == src.value and info.value.detail["to"] == dst.value


def test_error_is_reachable_from_every_active_state() -> None:
    for state in ("pulling", "starting", "warming", "ready", "serving", "idle", "unloading"):
        assert SlotState.ERROR in TRANSITIONS[SlotState(state)]


def test_state_json_round_trips_a_structured_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rec = SlotRecord(name="primary", state=SlotState.ERROR, seq=7, port=8081,
                     error=SlotError("backend_exited", "boom", {"exit_code": 1, "log_tail": ["x"], "probe": None}))
    store.write(rec)
    back = store.read("primary")
    assert back == rec
    assert list(tmp_path.joinpath("primary").iterdir()) == [tmp_path / "primary" / "state.json"]


def test_corrupt_state_json_is_quarantined(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path("x").parent.mkdir(parents=True)
    store.path("x").write_text('{"name": "x", "sta')
    from hal0.slots.store import CorruptState

    with pytest.raises(CorruptState):
        store.read("x")
    assert not store.path("x").exists()
    assert any(p.name.startswith("state.json.corrupt-") for p in store.path("x").parent.iterdir())


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hal0.slots.state import SlotState
    from hal0.slots.store import SlotRecord, StateStore
    store = StateStore(Path(sys.argv[1]))
    states = list(SlotState)
    seq = 0
    print("go", flush=True)
    while True:
        seq += 1
        store.write(SlotRecord(name="s", state=states[seq % len(states)], seq=seq, reason="x" * (seq % 5000)))
""")


@pytest.mark.slow
def test_state_json_is_never_half_written_when_the_writer_is_killed(tmp_path: Path) -> None:
    rng = random.Random(1234)
    last_seq = 0
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = tmp_path / "s" / "state.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        assert SlotState(data["state"])
        assert data["seq"] >= 1
        last_seq = data["seq"]
    assert last_seq > 0


async def test_a_subscription_returns_queued_events_even_without_waiting() -> None:
    from hal0.events import EventBus

    bus = EventBus()
    sub = bus.subscription(["slot"])
    bus.publish("slot", {"n": 1})
    bus.publish("decision", {"n": 2})
    bus.publish("slot", {"n": 3})
    got = []
    while (event := await sub.get(0)) is not None:
        got.append(event.data["n"])
    assert got == [1, 3]
    assert await sub.get(0.01) is None


def test_a_store_that_closes_writes_its_pending_record_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A written-behind record waits for a newer one to replace it; a stopping API (which waits for the writer)
    does not wait that out: with an hour's delay, `close` still returns with the record on disk."""
    import hal0.slots.store as store_module

    monkeypatch.setattr(store_module, "WRITE_BEHIND_DELAY_S", 3600.0)
    store = StateStore(tmp_path)
    store.write(SlotRecord(name="primary", state=SlotState.READY, seq=7), mode="behind")
    assert store.read("primary") is None  # still waiting for a newer record
    store.close()
    record = store.read("primary")
    assert record is not None and (record.state, record.seq) == (SlotState.READY, 7)
