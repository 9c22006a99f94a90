"""The slot lifecycle through the real /api: real llama-server backends on loopback, state.json, adoption after
an API crash, structured errors, the SSE event stream, user slots, ports and the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hal0.supervisors.base import LOG_MAX_BYTES
from tests.conftest import Hal0, alive, backend_pids, wait_until


# -- helpers ------------------------------------------------------------------------------------------------
def chat(port: int) -> dict[str, Any]:
    """A real chat completion straight from a backend port."""
    resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                            "temperature": 0})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    return body


def assign(hal0: Hal0, slot: str, ref: str | None) -> dict[str, Any]:
    resp = hal0.client.put(f"/api/slots/{slot}/model", json={"model": ref})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def load(hal0: Hal0, slot: str) -> httpx.Response:
    return hal0.client.post(f"/api/slots/{slot}/load")


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an error response, after checking its status and shape."""
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    return err


def run_cli(hal0: Hal0, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hal0.cli", "--url", hal0.url, *args], env=hal0.env,
                          capture_output=True, text=True, timeout=60, check=False)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream into dicts: the JSON data, plus the frame's `id` and `event` fields."""
    frame: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                event: dict[str, Any] = json.loads("\n".join(data))
                event["sse_id"] = int(frame["id"])
                event["sse_event"] = frame.get("event")
                yield event
            frame, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)
            else:
                frame[key] = value


@contextlib.contextmanager
def event_stream(hal0: Hal0, last_event_id: int | None = None) -> Iterator[Iterator[dict[str, Any]]]:
    """The slot topic of /api/events; a read that waits more than 10 s fails instead of hanging."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with (httpx.Client(base_url=hal0.url, timeout=10) as client,
          client.stream("GET", "/api/events", params={"topics": "slot"}, headers=headers) as resp):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield sse_events(resp.iter_lines())


def read_until(events: Iterator[dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        out.append(event)
        if done(event):
            return out
    raise AssertionError(f"event stream ended early after {out}")


def transitions(events: list[dict[str, Any]], slot: str) -> list[str]:
    return [e["to"] for e in events if e.get("slot") == slot and "to" in e]


@pytest.fixture
def bare_hal0(hal0_factory: Callable[[str | None], Hal0]) -> Hal0:
    """hal0 for tests that never start a backend: runs without a llama-server on the machine."""
    return hal0_factory(None)


@pytest.fixture
def ready_primary(hal0: Hal0, model_files: dict[str, Path]) -> Hal0:
    """hal0 with `primary` assigned the tiny model and loaded through the API."""
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    resp = load(hal0, "primary")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "ready"
    return hal0


# -- loading a real backend ---------------------------------------------------------------------------------
@pytest.mark.llama
def test_slot_loaded_through_the_api_answers_a_real_chat_completion(hal0: Hal0,
                                                                    model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    before = hal0.state("primary")
    assert before["state"] == "offline"

    assigned = assign(hal0, "primary", "tiny")
    assert assigned["config"]["model"] == "tiny"
    assert assigned["state"] == "offline"

    resp = load(hal0, "primary")
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["state"] == "ready"

    state = hal0.state("primary")
    assert state["state"] == "ready"
    assert state["model"] == "tiny"
    assert state["provider"] == "llama.cpp"
    assert state["supervisor"] == "embedded"
    assert isinstance(state["pid"], int) and alive(state["pid"])
    assert hal0.port_min <= state["port"] <= hal0.port_max
    assert state["seq"] > before["seq"]
    assert state["error"] is None
    assert (view["pid"], view["port"], view["seq"]) == (state["pid"], state["port"], state["seq"])

    chat(state["port"])


@pytest.mark.llama
@pytest.mark.slow
def test_a_loaded_slot_survives_an_api_crash_and_is_adopted_without_a_second_backend(
        ready_primary: Hal0) -> None:
    hal0 = ready_primary
    before = hal0.state("primary")
    assert backend_pids(hal0.home) == [before["pid"]]

    hal0.kill()
    assert alive(before["pid"]), "the backend must outlive the API"
    chat(before["port"])
    hal0.start()

    view = hal0.slot("primary")
    assert view["state"] == "ready"
    assert view["pid"] == before["pid"]
    assert view["port"] == before["port"]
    after = hal0.state("primary")
    assert (after["state"], after["pid"], after["port"]) == ("ready", before["pid"], before["port"])
    chat(after["port"])

    assert backend_pids(hal0.home) == [before["pid"]]
    assert len(hal0.start_lines("primary")) == 1


@pytest.mark.llama
@pytest.mark.slow
def test_an_api_crash_during_warm_up_is_resumed_by_adoption(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    resp = hal0.client.post("/api/slots/primary/load", params={"wait": "false"})
    assert resp.status_code == 200, resp.text

    loading = wait_until(lambda: (s := hal0.state("primary"))["pid"] and s["state"] in ("starting", "warming")
                         and s, 30, "primary to have a backend pid while loading")
    pid = loading["pid"]
    # Freeze the backend so the crash lands mid-warm-up however fast this machine loads the model
    # (the tiny model needs a few hundred ms from spawn to a passing probe; the poll above takes a few ms).
    os.kill(pid, signal.SIGSTOP)
    try:
        hal0.kill()
        crashed = hal0.state("primary")
        assert crashed["state"] in ("starting", "warming"), crashed
        assert crashed["pid"] == pid
    finally:
        os.kill(pid, signal.SIGCONT)

    hal0.start()
    ready = wait_until(lambda: (s := hal0.state("primary"))["state"] not in ("starting", "warming") and s,
                       60, "adoption to finish the warm-up")
    assert ready["state"] == "ready", ready
    assert ready["pid"] == pid
    assert hal0.slot("primary")["state"] == "ready"
    chat(ready["port"])
    assert backend_pids(hal0.home) == [pid]
    assert len(hal0.start_lines("primary")) == 1


def event_at(hal0: Hal0, slot: str, seq: int) -> dict[str, Any]:
    """The slot event that published record `seq` (replayed from the ring: Last-Event-ID 0)."""
    with event_stream(hal0, last_event_id=0) as events:
        seen = read_until(events, lambda e: e.get("slot") == slot and e.get("seq", -1) >= seq)
    at = [e for e in seen if e.get("slot") == slot and e.get("seq") == seq]
    assert at, f"no event carries record seq {seq}: {[(e.get('seq'), e.get('to'), e.get('event')) for e in seen]}"
    return at[-1]


def fields(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["state"], record["pid"], record["port"], record["unit"], record["seq"]


@pytest.mark.llama
@pytest.mark.slow
def test_state_json_and_the_event_stream_agree_on_pid_and_port_after_spawn_and_adoption(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    assert hal0.client.post("/api/slots/primary/load", params={"wait": "false"}).status_code == 200
    loading = wait_until(lambda: (s := hal0.state("primary"))["pid"] and s["state"] in ("starting", "warming")
                         and s, 30, "primary to have a backend pid while loading")
    pid = loading["pid"]
    # Frozen right after its spawn, the backend holds the slot where the pid was just recorded.
    os.kill(pid, signal.SIGSTOP)
    try:
        on_disk = hal0.state("primary")
        assert on_disk["pid"] == pid and on_disk["port"], on_disk
        assert fields(event_at(hal0, "primary", on_disk["seq"])["record"]) == fields(on_disk)

        # An API that died between the spawn and writing the pid: the next one finds the backend by its
        # pidfile, and says so in state.json and on the event stream alike.
        hal0.kill()
        crashed = hal0.state("primary")
        crashed["pid"] = None
        (hal0.home / "state" / "slots" / "primary" / "state.json").write_text(json.dumps(crashed))
    finally:
        os.kill(pid, signal.SIGCONT)
    hal0.start()
    ready = wait_until(lambda: (s := hal0.state("primary"))["state"] == "ready" and s, 60, "adoption to end ready")
    assert (ready["pid"], ready["port"]) == (pid, crashed["port"])
    found = event_at(hal0, "primary", crashed["seq"] + 1)
    assert (found.get("event"), found.get("changed"), found["record"]["pid"]) == ("changed", ["pid"], pid), found
    assert fields(event_at(hal0, "primary", ready["seq"])["record"]) == fields(ready)
    assert fields(hal0.slot("primary")) == fields(ready)
    assert backend_pids(hal0.home) == [pid]


@pytest.mark.llama
@pytest.mark.slow
@pytest.mark.parametrize("pidfile", ["written", "empty"])
def test_a_backend_spawned_by_an_api_that_died_before_recording_it_is_stopped_by_the_next(
        hal0: Hal0, model_files: dict[str, Path], pidfile: str) -> None:
    """The embedded supervisor spawns first and the slot writes its move to starting (with the pid) after: an
    API killed in between leaves state.json as it was before the load, and a backend nothing records. The next
    API finds it by the pidfile (`written`: killed after the spawn; `empty`: before the pid was written, found
    by its mark) and stops it; the slot loads again, on the same port, with one backend."""
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    before = hal0.state("primary")
    assert before["state"] == "offline"
    assert hal0.client.post("/api/slots/primary/load", params={"wait": "false"}).status_code == 200
    pid = wait_until(lambda: hal0.state("primary")["pid"], 30, "primary's backend pid")
    os.kill(pid, signal.SIGSTOP)  # held where it was spawned, while the API dies
    try:
        hal0.kill()
        slot_dir = hal0.home / "state" / "slots" / "primary"
        (slot_dir / "state.json").write_text(json.dumps(before))
        if pidfile == "empty":
            (slot_dir / "backend.pid").write_text("")
    finally:
        os.kill(pid, signal.SIGCONT)
    hal0.start()
    wait_until(lambda: not alive(pid), 30, "the unrecorded backend to be stopped")
    assert hal0.slot("primary")["state"] == "offline"
    assert not (slot_dir / "backend.pid").exists()
    resp = load(hal0, "primary")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]]


@pytest.mark.llama
@pytest.mark.slow
def test_an_unload_while_the_move_to_starting_is_not_yet_written_leaves_nothing_running(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    """The move to starting is made in memory first and written with the pid after the spawn. A backend log past
    its cap is rotated in a thread before the spawn, which holds the load in that state for a while: an unload
    that lands then (or anywhere else in the load) leaves the slot offline in memory and on disk, with no
    backend and no pidfile."""
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    log = hal0.home / "logs" / "slots" / "primary.log"
    for _ in range(3):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:  # past the cap: the next start copies it aside first (tens of ms)
            fh.truncate(LOG_MAX_BYTES * 4)
        assert hal0.client.post("/api/slots/primary/load", params={"wait": "false"}).status_code == 200
        assert hal0.client.post("/api/slots/primary/unload").status_code == 200
        assert hal0.slot("primary")["state"] == "offline"
        assert hal0.state("primary")["state"] == "offline" and hal0.state("primary")["pid"] is None
        assert backend_pids(hal0.home) == []
        assert not (hal0.home / "state" / "slots" / "primary" / "backend.pid").exists()
    resp = load(hal0, "primary")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    assert backend_pids(hal0.home) == [hal0.state("primary")["pid"]]


# -- failures are explained ------------------------------------------------------------------------------------
@pytest.mark.llama
def test_a_corrupt_gguf_puts_the_slot_in_error_with_llama_cpps_own_message(hal0: Hal0,
                                                                           model_files: dict[str, Path]) -> None:
    hal0.add_broken_model("broken", model_files["tiny"], model_files["corrupt"])
    hal0.start()
    assign(hal0, "primary", "broken")

    err = error_of(load(hal0, "primary"), 503)
    assert err["code"] == "backend_exited"

    view = hal0.slot("primary")
    assert view["state"] == "error"
    error = view["error"]
    assert error["code"] == "backend_exited"
    assert "failed to load model" in error["message"]
    detail = error["detail"]
    assert detail["exit_code"] is not None and detail["exit_code"] != 0
    assert any("failed to load model" in line for line in detail["log_tail"]), detail["log_tail"]
    assert any(line.startswith("=== hal0: starting slot") for line in detail["log_tail"])
    assert hal0.state("primary")["error"] == error
    assert [h["to"] for h in view["history"]][-1] == "error"

    shown = run_cli(hal0, "slot", "show", "primary")
    assert shown.returncode == 0, shown.stderr
    assert "error" in shown.stdout
    assert "[backend_exited]" in shown.stdout
    assert f"exit code: {detail['exit_code']}" in shown.stdout
    assert "failed to load model" in shown.stdout

    as_json = run_cli(hal0, "--json", "slot", "show", "primary")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["error"] == error


def test_a_missing_llama_server_binary_is_a_clear_error_and_the_api_stays_up(
        hal0_factory: Callable[[str | None], Hal0], tmp_path: Path, model_files: dict[str, Path]) -> None:
    hal0 = hal0_factory(str(tmp_path / "nope"))
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")

    err = error_of(load(hal0, "primary"), 503)
    assert err["code"] == "binary_not_found"
    assert "llama-server" in err["message"]
    assert "Traceback" not in json.dumps(err)

    view = hal0.slot("primary")
    assert view["state"] == "error"
    assert view["error"]["code"] == "binary_not_found"
    assert view["error"]["detail"]["configured"] == str(tmp_path / "nope")
    assert view["pid"] is None
    assert hal0.state("primary")["error"]["code"] == "binary_not_found"

    assert hal0.client.get("/api/health").status_code == 200
    assert hal0.proc is not None and hal0.proc.poll() is None
    assert "Traceback" not in hal0.log.read_text()


# -- unload and the event stream ------------------------------------------------------------------------------
@pytest.mark.llama
def test_unload_is_graceful_and_the_event_stream_shows_every_transition_in_order(ready_primary: Hal0) -> None:
    hal0 = ready_primary
    pid = hal0.state("primary")["pid"]

    # Last-Event-ID 0 replays the load from the ring, then continues live: no gap between the two.
    with event_stream(hal0, last_event_id=0) as events:
        resp = hal0.client.post("/api/slots/primary/unload")
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "offline"
        seen = read_until(events, lambda e: e.get("slot") == "primary" and e.get("to") == "offline")

    assert transitions(seen, "primary") == ["starting", "warming", "ready", "unloading", "offline"]
    ids = [e["sse_id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e["sse_event"] == "slot" and e["topic"] == "slot" and e["id"] == e["sse_id"] for e in seen)
    moves = [e for e in seen if "to" in e]
    assert [e["seq"] for e in moves] == sorted(e["seq"] for e in moves)
    assert all(e["record"]["state"] == e["to"] for e in moves)

    assert not alive(pid)
    assert backend_pids(hal0.home) == []
    state = hal0.state("primary")
    assert (state["state"], state["pid"]) == ("offline", None)
    assert not (hal0.home / "state" / "slots" / "primary" / "backend.pid").exists()

    unloading = next(e for e in moves if e["to"] == "unloading")
    later = [e for e in seen if e["sse_id"] > unloading["sse_id"]]
    with event_stream(hal0, last_event_id=unloading["sse_id"]) as events:
        replayed = [next(events) for _ in later]
    assert [e["sse_id"] for e in replayed] == [e["sse_id"] for e in later]
    assert transitions(replayed, "primary") == ["offline"]


# -- user slots and validation ---------------------------------------------------------------------------------
def test_user_slots_are_created_listed_persisted_and_deleted(bare_hal0: Hal0) -> None:
    hal0 = bare_hal0
    hal0.start()
    toml = hal0.home / "config" / "slots" / "scratch.toml"

    resp = hal0.client.post("/api/slots", json={"name": "scratch", "type": "chat", "ctx_size": 512})
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == "scratch"
    assert resp.json()["state"] == "offline"
    names = [s["name"] for s in hal0.client.get("/api/slots").json()["data"]]
    assert names == ["primary", "embed", "stt", "tts", "scratch"]
    assert toml.is_file()
    assert 'name = "scratch"' in toml.read_text()
    assert "ctx_size = 512" in toml.read_text()

    err = error_of(hal0.client.post("/api/slots", json={"name": "scratch"}), 409)
    assert err["code"] == "slot_exists"

    assert hal0.client.delete("/api/slots/scratch").status_code == 204
    assert not toml.exists()
    assert "scratch" not in [s["name"] for s in hal0.client.get("/api/slots").json()["data"]]
    assert error_of(hal0.client.get("/api/slots/scratch"), 404)["code"] == "slot_not_found"


def test_built_in_slots_cannot_be_deleted(bare_hal0: Hal0) -> None:
    hal0 = bare_hal0
    hal0.start()
    for name in ("primary", "embed", "stt", "tts"):
        err = error_of(hal0.client.delete(f"/api/slots/{name}"), 409)
        assert err["code"] == "builtin_slot"
    assert [s["name"] for s in hal0.client.get("/api/slots").json()["data"]] == ["primary", "embed", "stt", "tts"]


HOSTILE_NAMES = ["../x", "..", "a/b", "x\x00y", "x\ny", "tab\there", "bell\x07", "x" * 500, "", "Upper",
                 "-leading", "naïve", "trailing\n"]  # `$` once let the last one through


def test_hostile_slot_names_are_refused_with_an_error_body(bare_hal0: Hal0) -> None:
    hal0 = bare_hal0
    hal0.start()
    for name in HOSTILE_NAMES:
        resp = hal0.client.post("/api/slots", json={"name": name, "type": "chat"})
        err = error_of(resp, 400)
        assert err["type"] == "invalid_request_error", (name, err)
        assert err["code"] in ("invalid_slot_name", "invalid_request"), (name, err)
    assert [s["name"] for s in hal0.client.get("/api/slots").json()["data"]] == ["primary", "embed", "stt", "tts"]
    assert list(hal0.home.rglob("*.toml")) == []

    # The same names in a URL are unknown slots (or no route at all), never a server error.
    for raw in ("..%2Fx", "%2E%2E", "x%00y", "x%0Ay", "x" * 500, "a%2F..%2F..%2Fetc"):
        for method, path in (("GET", f"/api/slots/{raw}"), ("DELETE", f"/api/slots/{raw}"),
                             ("POST", f"/api/slots/{raw}/load")):
            err = error_of(hal0.client.request(method, path), 404)
            assert err["code"] in ("slot_not_found", "not_found"), (method, raw, err)
            assert len(err["message"]) < 300
    assert hal0.client.get("/api/health").status_code == 200


def test_unassigned_built_in_slots_are_offline_and_refuse_to_load(bare_hal0: Hal0) -> None:
    hal0 = bare_hal0
    hal0.start()
    slots = {s["name"]: s for s in hal0.client.get("/api/slots").json()["data"]}
    for name in ("primary", "embed", "stt", "tts"):
        assert slots[name]["state"] == "offline"
        assert slots[name]["reason"] == "no model assigned"
        assert slots[name]["config"]["model"] is None

    for name in ("primary", "embed"):
        err = error_of(load(hal0, name), 409)
        assert err["code"] == "no_model"
        assert name in err["message"]
        assert hal0.state(name)["state"] == "offline"


# -- ports ------------------------------------------------------------------------------------------------------
@pytest.mark.llama
@pytest.mark.slow
def test_two_loaded_slots_never_share_a_port(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.add_model("tiny-embed", model_files["embed"], slot_type="embed")
    hal0.start()
    assign(hal0, "primary", "tiny")
    assign(hal0, "embed", "tiny-embed")
    created = hal0.client.post("/api/slots", json={"name": "second", "type": "chat", "model": "tiny"})
    assert created.status_code == 201, created.text

    for name in ("primary", "embed", "second"):
        resp = load(hal0, name)
        assert resp.status_code == 200, resp.text

    ports = {name: hal0.state(name)["port"] for name in ("primary", "embed", "second")}
    assert len(set(ports.values())) == 3, ports
    assert all(hal0.port_min <= p <= hal0.port_max for p in ports.values())
    chat(ports["primary"])
    chat(ports["second"])
    emb = httpx.post(f"http://127.0.0.1:{ports['embed']}/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert emb.status_code == 200, emb.text
    assert emb.json()["data"][0]["embedding"]


def test_a_foreign_process_on_a_slot_fixed_port_is_reported_as_port_in_use(
        bare_hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0 = bare_hal0
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        created = hal0.client.post("/api/slots",
                                   json={"name": "fixed", "type": "chat", "model": "tiny", "port": port})
        assert created.status_code == 201, created.text

        err = error_of(load(hal0, "fixed"), 503)
        assert err["code"] == "port_in_use"
        view = hal0.slot("fixed")
        assert view["state"] == "error"
        assert view["error"]["code"] == "port_in_use"
        assert view["error"]["detail"]["port"] == port
        assert view["pid"] is None
    assert backend_pids(hal0.home) == []


# -- the CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.llama
def test_cli_slot_list_and_its_json_agree_with_the_api(ready_primary: Hal0) -> None:
    hal0 = ready_primary
    created = hal0.client.post("/api/slots", json={"name": "extra", "type": "embed"})
    assert created.status_code == 201, created.text

    as_json = run_cli(hal0, "--json", "slot", "list")
    assert as_json.returncode == 0, as_json.stderr
    api = hal0.client.get("/api/slots").json()["data"]
    cli = json.loads(as_json.stdout)

    def stable(slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # uptime and memory (RSS) are live: they differ between two reads
        return [{k: v for k, v in s.items() if k not in ("uptime_s", "memory")} for s in slots]

    assert stable(cli) == stable(api)

    table = run_cli(hal0, "slot", "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "TYPE", "STATE"]
    listed = {row.split()[0]: row.split() for row in rows}
    assert list(listed) == [s["name"] for s in api]
    for slot in api:
        assert listed[slot["name"]][1:3] == [slot["type"], slot["state"]]
    primary = listed["primary"]
    assert "tiny" in primary
    assert str(hal0.state("primary")["pid"]) in primary
    assert str(hal0.state("primary")["port"]) in primary


@pytest.mark.llama
def test_cli_events_show_transitions_and_field_changes_as_lines(ready_primary: Hal0) -> None:
    hal0 = ready_primary
    assert hal0.client.post("/api/slots/primary/unload").status_code == 200
    events = subprocess.Popen([sys.executable, "-m", "hal0.cli", "--url", hal0.url, "events", "--topic", "slot"],
                              env=hal0.env, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert events.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in events.stdout or ()),
                              daemon=True)
    reader.start()
    try:
        # The stream is live once it shows an event: re-assigning `embed` to nothing publishes one.
        def live() -> bool:
            assert hal0.client.put("/api/slots/embed/model", json={"model": None}).status_code == 200
            return bool(lines)
        wait_until(live, 30, "`hal0 events` to show an event")
        assert load(hal0, "primary").json()["state"] == "ready"
        wait_until(lambda: any("-> ready" in line for line in lines), 30, "the load's lines")
    finally:
        events.kill()
        events.wait(10)
    pid = hal0.state("primary")["pid"]
    assert any("offline -> starting" in line for line in lines), lines
    changed = [line for line in lines if " changed " in line]
    assert changed and f"pid={pid}" in changed[0] and "backend started" in changed[0], lines
