"""Faults injected into real processes: backends killed or frozen mid-request, foreign processes on slot ports,
the API SIGKILLed mid-load, corrupt state files, a full disk, and a storm of concurrent calls on one slot.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from hal0.registry.store import ModelStore
from tests.conftest import Hal0, alive, backend_pids, wait_until

PROMPT = [{"role": "user", "content": "hello"}]


def chat(h: Hal0, model: str = "primary", **extra: Any) -> httpx.Response:
    return h.client.post("/v1/chat/completions",
                         json={"model": model, "messages": PROMPT, "max_tokens": 4, **extra}, timeout=60)


def ready_primary(h: Hal0, model_files: dict[str, Path], *, env: dict[str, str] | None = None,
                  models: ModelStore | None = None) -> Hal0:
    (models or h.models).import_file("tiny", model_files["tiny"], slot_type="chat", link=True)
    h.start(env=env)
    assert h.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    resp = h.client.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    return h


@contextlib.contextmanager
def listener(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A foreign process holding a loopback port (not hal0's, not a backend)."""
    code = ("import socket,sys,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('127.0.0.1',{port}));s.listen();print('up',flush=True)\ntime.sleep(600)")
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


# -- backends that die or hang ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_backend_killed_mid_stream_errors_the_stream_and_the_slot_recovers_on_the_next_request(
        hal0: Hal0, large_model: Path) -> None:
    hal0.add_model("big", large_model)
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "big"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"
    pid = hal0.state("primary")["pid"]
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 1500, "stream": True}
    with hal0.client.stream("POST", "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                os.kill(pid, signal.SIGKILL)
                break
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest and '"code": "backend_failed"' in rest[-1], rest[-3:]
    wait_until(lambda: hal0.slot("primary")["state"] == "error", 10, "the slot to go to error")
    error = hal0.slot("primary")["error"]
    assert error["code"] == "backend_exited" and "SIGKILL" in error["message"]
    assert hal0.state("primary")["error"]["code"] == "backend_exited"
    # The next request is the next load: it brings the slot back and is answered.
    assert chat(hal0).status_code == 200
    assert hal0.slot("primary")["state"] in ("ready", "serving")
    assert len(backend_pids(hal0.home)) == 1


@pytest.mark.slow
def test_a_frozen_backend_is_found_without_a_request_stopped_and_reloaded_by_the_next(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    pid = hal0.state("primary")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # No request is needed: the liveness probe notices, and the slot explains itself.
        view = wait_until(lambda: (v := hal0.slot("primary"))["state"] == "error" and v, 20,
                          "the frozen backend to be noticed")
        assert view["error"]["code"] == "backend_unresponsive", view["error"]
        assert str(pid) in view["error"]["message"]
        wait_until(lambda: not alive(pid), 10, "the frozen backend to be stopped")
        # The API itself never hangs with its backend, and the next request loads the slot again.
        assert hal0.client.get("/api/health", timeout=2).status_code == 200
        assert chat(hal0).status_code == 200
        assert hal0.state("primary")["pid"] != pid
        assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_request_to_a_frozen_backend_fails_within_the_request_timeout(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files, env={"HAL0_REQUEST_TIMEOUT_S": "1"})
    pid = hal0.state("primary")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        frozen = chat(hal0)
        assert frozen.status_code in (502, 503), frozen.text
        assert frozen.json()["error"]["code"] in ("backend_unreachable", "backend_failed", "backend_unresponsive",
                                                  "backend_exited")
        assert time.monotonic() - started < 10
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_backend_frozen_while_the_api_was_down_fails_its_adoption_without_holding_the_api_back(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    pid = hal0.state("primary")["pid"]
    hal0.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGSTOP)
    try:
        # The API listens before it imports and adopts: a client that connects meanwhile is not refused, and is
        # answered while the adoption's probe still waits on the frozen backend. The slot is what the earlier
        # API left, with no error yet (the probe is given seconds, see the next step).
        hal0.start(wait=False)
        sock = wait_until(lambda: _connected(hal0.port), 10, "the API's port to accept connections")
        with sock:
            sock.settimeout(30)
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
        view = hal0.slot("primary")
        assert view["state"] == "ready" and view["error"] is None and view["adopting"] is True, view
        # A request for the slot waits for that probe, and is told why it failed once it runs out: as long as the
        # liveness watch gives a loaded backend, not a load's 30 s; the frozen process is stopped at once
        # (SIGTERM with SIGCONT).
        started = time.monotonic()
        held = chat(hal0)
        assert time.monotonic() - started < 15
        assert held.status_code == 503, held.text
        assert held.json()["error"]["code"] == "adoption_probe_failed", held.text
        assert str(pid) in held.json()["error"]["message"]
        view = hal0.slot("primary")
        assert view["state"] == "error" and view["error"]["code"] == "adoption_probe_failed", view
        wait_until(lambda: not alive(pid), 5, "the frozen backend to be stopped")
        assert chat(hal0).status_code == 200
        assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]] != [pid]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_requests_during_an_adoption_are_held_for_its_probe_and_answered_by_the_same_backend(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    pid = hal0.state("primary")["pid"]
    seq = hal0.state("primary")["seq"]
    hal0.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGSTOP)
    try:
        hal0.start()
        with ThreadPoolExecutor(3) as pool:
            asked = [pool.submit(chat, hal0, stream=stream) for stream in (False, True, False)]
            time.sleep(1.0)
            assert not any(f.done() for f in asked), [f.result().text for f in asked if f.done()]
            os.kill(pid, signal.SIGCONT)  # the backend answers again, well within the adoption probe's time
            answers = [f.result(timeout=60) for f in asked]
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert "data: [DONE]" in answers[1].text
        record = hal0.state("primary")
        assert record["pid"] == pid and backend_pids(hal0.home) == [pid]
        assert hal0.slot("primary")["adopting"] is False
        # No reload, and no transition but the requests' own (ready -> serving -> ready ...).
        assert record["state"] in ("ready", "serving") and record["loaded_at"] is not None
        assert record["seq"] >= seq and len(hal0.start_lines("primary")) == 1
        resp = hal0.client.get("/api/decisions", params={"limit": 50, "endpoint": "/v1/chat/completions"})
        reasons = [d["reason"] for d in resp.json()["data"]]
        assert len(reasons) == 3 and all(",adopting" in r for r in reasons), reasons
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_an_unload_during_an_adoption_cancels_its_probe_and_stops_the_backend(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    pid = hal0.state("primary")["pid"]
    hal0.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGSTOP)
    try:
        hal0.start()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(chat, hal0)
            time.sleep(0.5)
            started = time.monotonic()
            resp = hal0.client.post("/api/slots/primary/unload", timeout=30)
            assert resp.status_code == 200 and resp.json()["state"] == "offline", resp.text
            # The unload did not wait out the probe of the frozen backend (seconds): it cancelled it.
            assert time.monotonic() - started < 3
            cancelled = waiting.result(timeout=30)
        assert cancelled.status_code == 409, cancelled.text
        assert cancelled.json()["error"]["code"] == "load_cancelled", cancelled.text
        wait_until(lambda: not alive(pid), 5, "the adopted backend to be stopped")
        assert hal0.state("primary")["state"] == "offline" and hal0.state("primary")["pid"] is None
        assert chat(hal0).status_code == 200
        assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]] != [pid]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _connected(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return None


@pytest.mark.slow
def test_a_request_given_up_while_queued_at_the_gate_leaves_no_count_behind(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    """Four requests fill the backend's gate (the slot's `--threads-http 8` leaves room for four), a fifth waits
    for a place and its client goes away: it is counted out (in flight, the lease), logged as
    `client_disconnected`, and takes no place from the requests after it."""
    hal0.models.import_file("tiny", model_files["tiny"], slot_type="chat", link=True)
    hal0.write_slot_config("primary", 'type = "chat"\nmodel = "tiny"\nargs = ["--threads-http", "8"]\n')
    hal0.start()
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"
    pid = hal0.state("primary")["pid"]
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 4}
    os.kill(pid, signal.SIGSTOP)  # what is sent now waits, holding its place in the gate
    try:
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(chat, hal0) for _ in range(4)]
            wait_until(lambda: hal0.slot("primary")["in_flight"] == 4, 5, "four requests in flight")
            with socket.create_connection(("127.0.0.1", hal0.port)) as queued:
                raw = json.dumps(body).encode()
                queued.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: queued\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(raw), raw))
                wait_until(lambda: hal0.slot("primary")["in_flight"] == 5, 5, "the fifth to wait at the gate")
            wait_until(lambda: hal0.slot("primary")["in_flight"] == 4, 5, "the fifth to be counted out")
            os.kill(pid, signal.SIGCONT)
            assert [f.result(30).status_code for f in held] == [200] * 4
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    view = wait_until(lambda: (v := hal0.slot("primary"))["in_flight"] == 0 and v, 5, "every request released")
    assert view["state"] == "ready"
    records = hal0.client.get("/api/decisions", params={"limit": 20}).json()["data"]
    assert [d["outcome"] for d in records if d["request_id"] == "queued"] == ["client_disconnected"]
    # No place in the gate was lost: as many requests as it holds go through at once, and more after them.
    with ThreadPoolExecutor(8) as pool:
        assert [r.status_code for r in pool.map(lambda _: chat(hal0), range(8))] == [200] * 8
    assert hal0.slot("primary")["in_flight"] == 0


# -- ports -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_foreign_process_on_a_slot_port_is_never_adopted_nor_killed(hal0: Hal0,
                                                                         model_files: dict[str, Path]) -> None:
    # A foreign listener on the first port of the range: the allocator steps over it.
    with listener(hal0.port_min) as foreign:
        ready_primary(hal0, model_files)
        port = hal0.state("primary")["port"]
        assert port != hal0.port_min and alive(foreign.pid)
        assert chat(hal0).status_code == 200
    # The API crashes, the backend dies while it is down and a foreign process takes its port.
    pid = hal0.state("primary")["pid"]
    hal0.kill()
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 10, "the backend to die")
    with listener(port) as foreign:
        hal0.start()
        slot = hal0.slot("primary")
        assert slot["state"] == "error" and slot["error"]["code"] == "backend_gone", slot
        assert alive(foreign.pid)
        assert chat(hal0).status_code == 200
        assert hal0.state("primary")["port"] != port and alive(foreign.pid)


# -- the API killed ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_of_the_api_during_loads_and_state_writes_never_corrupts_or_duplicates(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    rng = random.Random(8)
    for _round in range(6):
        # Loads and unloads write state.json many times a second; the kill lands somewhere among them.
        hal0.client.post("/api/slots/primary/load", params={"wait": "false"})
        if rng.random() < 0.5:
            wait_until(lambda: hal0.state("primary")["state"] in ("warming", "ready"), 20, "a load under way")
        time.sleep(rng.uniform(0, 0.05))
        hal0.kill()
        record = hal0.state("primary")  # parses: the file is whole
        assert record["state"] in ("offline", "starting", "warming", "ready", "serving", "idle")
        assert len(backend_pids(hal0.home)) <= 1
        hal0.start()
        wait_until(lambda: hal0.slot("primary")["state"] in ("ready", "offline", "error"), 30, "adoption")
        assert len(backend_pids(hal0.home)) <= 1
        if rng.random() < 0.5:
            hal0.client.post("/api/slots/primary/unload")
    resp = hal0.client.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]]
    assert chat(hal0).status_code == 200


def test_corrupt_or_truncated_state_files_are_quarantined_and_the_api_starts(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("u1", 'type = "chat"\nmodel = "tiny"\n')
    state = hal0.home / "state" / "slots"
    (state / "primary").mkdir(parents=True)
    (state / "primary" / "state.json").write_text('{"name": "primary", "state": "rea')  # truncated mid-write
    (state / "u1").mkdir(parents=True)
    (state / "u1" / "state.json").write_bytes(b"\x00\xff garbage \x00")
    (state / "embed").mkdir(parents=True)
    (state / "embed" / "state.json").write_text('{"name": "embed", "state": "on-fire"}')  # valid JSON, bad state
    hal0.start()
    for name in ("primary", "u1", "embed"):
        slot = hal0.slot(name)
        assert slot["state"] == "offline", slot
        assert (slot["error"]["code"] == "state_corrupt" and "quarantined" in slot["error"]["detail"]) or \
            "corrupt" in slot["reason"], slot
        assert list((state / name).glob("state.json.corrupt-*")), name
        assert hal0.state(name)["state"] == "offline"
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"


# -- a full disk -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a small tmpfs: {result.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (not root?): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of `folder` until at most `leave` bytes are free."""
    filler = folder / "filler"
    with filler.open("ab") as fh:
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            try:
                fh.write(b"\0" * min(free - leave if free > leave else 4096, 1 << 20) or b"\0")
                fh.flush()
            except OSError:
                break


@pytest.mark.slow
def test_a_full_disk_fails_pulls_and_state_writes_cleanly(hal0: Hal0, model_files: dict[str, Path],
                                                          tmp_path: Path) -> None:
    # 300 MiB: the registry keeps a 256 MiB safety margin free, so the model must fit with it first.
    with small_disk(tmp_path / "disk", "300m") as disk:
        hal0.env["HAL0_STATE_DIR"] = str(disk / "state")
        ready_primary(hal0, model_files, models=ModelStore(disk / "state" / "models"))

        def state_of(slot: str) -> dict[str, Any]:
            return json.loads((disk / "state" / "slots" / slot / "state.json").read_text())  # type: ignore[no-any-return]
        # A pull that cannot fit: refused with 507 before a byte is written, nothing half-installed.
        blob = tmp_path / "blob.gguf"
        blob.write_bytes(os.urandom(3 << 20))
        fill(disk, leave=100 << 20)
        resp = hal0.client.post("/api/models/pull", json={"ref": "blob", "source": str(blob), "wait": True})
        assert resp.status_code == 507, resp.text
        assert resp.json()["error"]["code"] == "insufficient_disk"
        assert not (disk / "state" / "models" / "blob").exists() or not any(
            (disk / "state" / "models" / "blob").iterdir())

        # The disk fills up under a loaded slot: state writes fail, the API stays up and says why.
        before = state_of("primary")
        fill(disk)
        resp = hal0.client.post("/api/slots/primary/unload")
        assert resp.status_code == 507, resp.text
        assert resp.json()["error"]["code"] == "disk_full" and "disk" in resp.json()["error"]["message"]
        assert hal0.client.get("/api/health").status_code == 200
        # Not written means not done: the file is whole and unchanged, and the API agrees with it.
        assert state_of("primary") == before
        assert hal0.slot("primary")["state"] == "ready" and hal0.slot("primary")["seq"] == before["seq"]
        assert chat(hal0).status_code in (200, 507)
        (disk / "filler").unlink()
        resp = hal0.client.post("/api/slots/primary/unload")
        assert resp.status_code == 200, resp.text
        resp = hal0.client.post("/api/slots/primary/load")
        assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
        assert len(backend_pids(disk)) == 1

        # A load with the disk full: the backend is spawned before its move to starting is written (see
        # `Supervisor.spawns_at_once`), so what cannot be written ends it again. Refused with 507, nothing left
        # running, state.json and the API still say offline.
        assert hal0.client.post("/api/slots/primary/unload").status_code == 200
        offline = state_of("primary")
        fill(disk)
        resp = hal0.client.post("/api/slots/primary/load")
        assert resp.status_code == 507 and resp.json()["error"]["code"] == "disk_full", resp.text
        assert backend_pids(disk) == []
        assert state_of("primary") == offline
        assert hal0.slot("primary")["state"] == "offline" and hal0.slot("primary")["seq"] >= offline["seq"]
        (disk / "filler").unlink()
        resp = hal0.client.post("/api/slots/primary/load")
        assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
        assert len(backend_pids(disk)) == 1
        hal0.stop()
        for pidfile in (disk / "state" / "slots").glob("*/backend.pid"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)


# -- a storm of calls on one slot ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_storm_of_load_unload_assign_on_one_slot_never_runs_two_backends(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.add_model("tiny2", model_files["tiny"])
    hal0.start()
    http = httpx.Client(base_url=hal0.url, timeout=120, limits=httpx.Limits(max_connections=32))
    assert http.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            pids = backend_pids(hal0.home)
            if len(pids) > 1:
                violations.append(f"two backends: {pids}")
            try:
                json.loads((hal0.home / "state" / "slots" / "primary" / "state.json").read_text())
            except (OSError, ValueError) as exc:
                violations.append(f"state.json unreadable: {exc}")
            stop.wait(0.005)

    calls = [("POST", "/api/slots/primary/load", None), ("POST", "/api/slots/primary/load?wait=false", None),
             ("POST", "/api/slots/primary/unload", None), ("POST", "/api/slots/primary/restart", None),
             ("PUT", "/api/slots/primary/model", {"model": "tiny"}),
             ("PUT", "/api/slots/primary/model", {"model": "tiny2"})]
    rng = random.Random(8)
    plan = [rng.choice(calls) for _ in range(120)]

    def call(item: tuple[str, str, dict[str, str] | None]) -> int:
        method, path, body = item
        return http.request(method, path, json=body).status_code

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(call, plan))
    finally:
        stop.set()
        watcher.join()
    assert not violations, violations[:5]
    assert all(s < 500 or s == 503 for s in statuses), statuses
    assert statuses.count(200) > len(plan) // 2
    # Settled: the API, state.json and the processes agree.
    resp = http.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    slot = hal0.slot("primary")
    assert hal0.state("primary")["seq"] == slot["seq"] and hal0.state("primary")["pid"] == slot["pid"]
    assert backend_pids(hal0.home) == [slot["pid"]]
    assert chat(hal0).status_code == 200
    http.close()


def test_port_is_free_helper_sees_a_foreign_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        from hal0.slots.manager import port_is_free

        assert not port_is_free(sock.getsockname()[1])
