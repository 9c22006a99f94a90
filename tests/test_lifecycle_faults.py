"""Faults in the states in between, against the real API and real backends: an unload or an assign while a slot
pulls its model, two APIs on one state folder, a state.json that is a directory, a full disk under the decision
log, and a client that leaves a non-streamed request.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hal0, SlowHub, backend_pids, free_port, wait_until
from tests.test_faults import chat, fill, ready_primary, small_disk

#: A catalog ref: a slot assigned to it pulls it on load.
REF = "qwen2.5-0.5b-instruct-q4_k_m"


def partials(h: Hal0) -> list[Path]:
    root = h.home / "state" / "models"
    return [p for p in root.rglob("*") if p.is_file() and ".partial" in p.name] if root.exists() else []


def start_pulling(h: Hal0, hub: SlowHub) -> None:
    h.start(env={"HF_ENDPOINT": hub.url})
    assert h.client.put("/api/slots/primary/model", json={"model": REF}).status_code == 200
    resp = h.client.post("/api/slots/primary/load", params={"wait": "false"})
    assert resp.status_code in (200, 202), resp.text
    wait_until(lambda: h.slot("primary")["state"] == "pulling" and hub.served > 40_000, 30,
               "the slot to be pulling with bytes on the wire")


# -- A: unload during pulling ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_unload_during_pulling_cancels_the_pull_and_a_later_load_resumes_it(hal0: Hal0, slow_hub: SlowHub) -> None:
    start_pulling(hal0, slow_hub)
    resp = hal0.client.post("/api/slots/primary/unload")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "offline"
    assert hal0.state("primary")["state"] == "offline"
    # The download stopped, and what it had fetched is kept for a resume.
    served = slow_hub.served
    wait_until(lambda: partials(hal0), 5, "the partial download to be kept")
    time.sleep(0.5)  # a stopped download sends nothing more over half a second (at 20 KB/s: ~10 KB otherwise)
    assert slow_hub.served - served <= 2 * int(slow_hub.rate / 20)
    assert not hal0.models.exists(REF)

    # A second load resumes from where the first stopped and ends ready.
    slow_hub.rate = 50_000_000
    resp = hal0.client.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    assert slow_hub.ranges[0] is None and slow_hub.ranges[-1] is not None and slow_hub.ranges[-1] != "bytes=0-"
    assert hal0.models.exists(REF)
    assert "Task exception was never retrieved" not in hal0.log.read_text()


@pytest.mark.slow
def test_a_second_load_during_pulling_joins_it_instead_of_failing(hal0: Hal0, slow_hub: SlowHub) -> None:
    start_pulling(hal0, slow_hub)
    resp = hal0.client.post("/api/slots/primary/load", params={"wait": "false"})
    assert resp.status_code in (200, 202), resp.text
    assert hal0.slot("primary")["state"] == "pulling"
    slow_hub.rate = 50_000_000
    wait_until(lambda: hal0.slot("primary")["state"] == "ready", 60, "the joined load to end ready")
    assert "Task exception was never retrieved" not in hal0.log.read_text()


# -- B: assign during pulling ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_assign_during_pulling_cancels_it_and_the_slot_follows_its_config(hal0: Hal0, slow_hub: SlowHub,
                                                                          model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    start_pulling(hal0, slow_hub)
    resp = hal0.client.put("/api/slots/primary/model", json={"model": "tiny"})
    assert resp.status_code == 200, resp.text
    view = wait_until(lambda: (v := hal0.slot("primary"))["state"] == "ready" and v, 30,
                      "the slot to load its new model")
    assert view["model"] == "tiny" and view["config"]["model"] == "tiny"
    assert hal0.state("primary")["model"] == "tiny"
    assert not hal0.models.exists(REF)
    served = slow_hub.served
    time.sleep(0.5)
    assert slow_hub.served - served <= 2 * int(slow_hub.rate / 20), "the old pull was cancelled"


@pytest.mark.slow
def test_a_model_still_loaded_by_a_slot_cannot_be_removed(hal0: Hal0, model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    resp = hal0.client.delete("/api/models/tiny")
    assert resp.status_code == 409, resp.text
    assert hal0.models.exists("tiny")


# -- C: one API per state folder -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_api_on_the_same_state_folder_exits_at_once_naming_the_first(hal0: Hal0,
                                                                              model_files: dict[str, Path]) -> None:
    ready_primary(hal0, model_files)
    assert hal0.proc is not None
    pid = hal0.state("primary")["pid"]
    before = hal0.state("primary")
    other = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "hal0.cli", "serve", "--port", str(other), "--no-demo", "--log-level", "warning"],
        env=hal0.env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert str(hal0.proc.pid) in result.stderr and str(hal0.port) in result.stderr, result.stderr
    # It touched nothing: same backend, same record.
    assert hal0.state("primary") == before
    assert backend_pids(hal0.home) == [pid]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{other}/api/health", timeout=1)
    assert chat(hal0).status_code == 200


# -- D: a state.json that is a directory -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_state_json_that_is_a_directory_is_quarantined_at_start_and_at_load(hal0: Hal0,
                                                                             model_files: dict[str, Path]) -> None:
    state = hal0.home / "state" / "slots" / "embed" / "state.json"
    (state / "inner").mkdir(parents=True)
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    view = hal0.slot("embed")
    assert view["state"] == "offline" and view["error"]["code"] == "state_corrupt", view
    assert state.is_file()
    assert list(state.parent.glob("state.json.corrupt-*"))
    assert hal0.slot("primary")["state"] == "offline"

    # The same while the API runs: the next write quarantines the directory and the load goes on.
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    primary = hal0.home / "state" / "slots" / "primary" / "state.json"
    primary.unlink()
    (primary / "inner").mkdir(parents=True)
    resp = hal0.client.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text
    assert json.loads(primary.read_text())["state"] == "ready" or hal0.state("primary")["state"] in (
        "ready", "warming")


# -- E: a full disk never drops decisions ------------------------------------------------------------------------
def doctor_api_check(h: Hal0) -> dict[str, Any]:
    """The `api` check of `hal0 doctor --json` against this API."""
    doctor = subprocess.run([sys.executable, "-m", "hal0.cli", "--url", h.url, "--json", "doctor"], env=h.env,
                            capture_output=True, text=True, timeout=120, check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    check: dict[str, Any] = checks["api"]
    return check


@pytest.mark.slow
def test_a_full_disk_keeps_decisions_in_memory_and_counts_the_failed_writes(hal0: Hal0,
                                                                           model_files: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from hal0.registry.store import ModelStore

    with small_disk(tmp_path / "logs", "4m") as disk:
        hal0.env["HAL0_LOG_DIR"] = str(disk)
        ready_primary(hal0, model_files, models=ModelStore(hal0.home / "state" / "models"))
        fill(disk)
        ids = [f"full-{i}" for i in range(20)]
        for rid in ids:
            resp = hal0.client.post("/v1/chat/completions", headers={"X-Request-Id": rid},
                                    json={"model": "primary", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2})
            assert resp.status_code == 200, resp.text
        # A record is appended as its response ends: the client can see the last response an instant before it.
        def all_seen() -> bool:
            data = hal0.client.get("/api/decisions", params={"limit": 100}).json()["data"]
            return set(ids) <= {d["request_id"] for d in data}
        wait_until(all_seen, 10, "every decision record in memory")
        health = hal0.client.get("/api/health").json()
        assert health["write_failures"]["decisions"] >= 1, health
        # `hal0 doctor` asks the running API and reports the failing writes.
        api = doctor_api_check(hal0)
        assert not api["ok"] and "writes failing now: decisions" in api["detail"], api
        assert "cannot write the decision log" in api["detail"], api
        log = hal0.log.read_text()
        assert log.count("Traceback") == 0, log[-3000:]
        assert log.count("cannot write the decision log") == 1, log[-3000:]
        # Space comes back: the held records reach the file, in order.
        (disk / "filler").unlink()
        resp = hal0.client.post("/v1/chat/completions", headers={"X-Request-Id": "after"},
                                json={"model": "primary", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2})
        assert resp.status_code == 200

        def on_disk() -> list[str]:
            lines = (disk / "decisions.jsonl").read_text().splitlines()
            return [json.loads(line)["request_id"] for line in lines if line.strip()]
        wait_until(lambda: "after" in on_disk(), 10, "the held decisions to be written")
        written = on_disk()
        assert [r for r in written if r in ids] == ids and written.index("after") > written.index(ids[-1])
        api = doctor_api_check(hal0)
        assert api["ok"] and "writes failed earlier" in api["detail"] and "decisions" in api["detail"], api
        hal0.stop()


# -- F: a client that leaves a non-streamed request -------------------------------------------------------------
@pytest.mark.slow
def test_a_client_that_leaves_a_non_streamed_request_cancels_it(hal0: Hal0, large_model: Path) -> None:
    hal0.add_model("big", large_model)
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "big"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"
    port = hal0.state("primary")["port"]
    body = {"model": "primary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{hal0.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "leave-me"},
                   timeout=httpx.Timeout(10, read=1.5))

    # Watched through its log, not /slots: llama-server checks a non-streamed request's connection only when
    # its result queue stays quiet for a second, and every /slots call wakes that queue.
    log = hal0.home / "logs" / "slots" / "primary.log"
    wait_until(lambda: "cancel task" in log.read_text(), 10, "llama-server to cancel the generation")
    # The log line comes as the cancel starts; the slot is free a moment later (seen busy once under load).
    wait_until(lambda: not any(s["is_processing"] for s in httpx.get(f"http://127.0.0.1:{port}/slots",
                                                                      timeout=5).json()),
               5, "llama-server's slot to be free")
    view = wait_until(lambda: (v := hal0.slot("primary"))["in_flight"] == 0 and v, 5, "the request released")
    assert view["state"] == "ready"
    record = wait_until(lambda: next((d for d in hal0.client.get("/api/decisions").json()["data"]
                                      if d["request_id"] == "leave-me"), None), 5, "the decision")
    assert record["outcome"] == "client_disconnected", record


# -- slow loris ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_connections_that_never_finish_their_request_head_are_closed(hal0: Hal0) -> None:
    hal0.start(env={"HAL0_HEADER_TIMEOUT_S": "1"})
    socks = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", hal0.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    dribbler = socket.create_connection(("127.0.0.1", hal0.port), timeout=10)
    dribbler.sendall(b"GET /api/health HTTP/1.1\r\n")
    closed_at = None
    started = time.monotonic()
    try:
        # One header byte now and then does not buy time: the deadline is for the whole head.
        while time.monotonic() - started < 8:
            try:
                dribbler.sendall(b"X")
            except OSError:
                closed_at = time.monotonic()
                break
            dribbler.settimeout(0.2)
            try:
                if dribbler.recv(1) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                # Closed with a dribbled byte still unread on the API's side: the kernel resets, not finishes.
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "a dribbling head was never cut off"
        for sock in socks:
            sock.settimeout(10)
            assert sock.recv(1) == b"", "a half-sent head was left open"
        # Well-formed requests are untouched, also on one connection kept alive past the head deadline.
        with httpx.Client(base_url=hal0.url) as client:
            assert client.get("/api/health").status_code == 200
            wait_until(lambda: time.monotonic() - started > 3, 5, "a moment past the deadline")
            assert client.get("/api/health").status_code == 200
    finally:
        for sock in [*socks, dribbler]:
            sock.close()


# -- a model file changed after import -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_model_file_changed_after_import_is_refused_at_load_and_verify_says_so(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    manifest = hal0.models.import_file("tiny", model_files["tiny"], slot_type="chat")  # a copy, not a link
    on_disk = hal0.models.file_path("tiny", manifest.primary_file.name)
    original = on_disk.read_bytes()
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    with on_disk.open("ab") as fh:
        fh.write(b"appended after import")
    resp = hal0.client.post("/api/slots/primary/load")
    assert resp.status_code in (409, 503), resp.text
    err = resp.json()["error"]
    assert err["code"] == "model_changed" and "hal0 model verify tiny" in err["message"], err
    assert not (hal0.home / "logs" / "slots" / "primary.log").exists() or not hal0.start_lines("primary")

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hal0.cli", "--url", hal0.url, "model", "verify", "tiny"],
                              env=hal0.env, capture_output=True, text=True, timeout=60, check=False)
    bad = verify()
    assert bad.returncode == 1 and "BAD" in bad.stdout and "sha256 differs" in bad.stdout, bad.stdout

    # The same bytes again, but touched: the quick check still refuses; a verify that hashes them accepts.
    on_disk.write_bytes(original)
    assert hal0.client.post("/api/slots/primary/load").json()["error"]["code"] == "model_changed"
    good = verify()
    assert good.returncode == 0 and "intact" in good.stdout, good.stdout + good.stderr
    resp = hal0.client.post("/api/slots/primary/load")
    assert resp.status_code == 200 and resp.json()["state"] == "ready", resp.text


# -- a large pull never stalls the API ---------------------------------------------------------------------------
#: Big enough that writing, hashing and fsyncing it takes a while: 512 MiB of one random 1 MiB block repeated.
BIG_BLOCK = 1 << 20
BIG_BLOCKS = 512


@pytest.fixture
def big_file_server() -> Iterator[tuple[str, str]]:
    """A loopback server of one large file, as fast as loopback goes; yields (url, sha256)."""
    block = os.urandom(BIG_BLOCK)
    digest = hashlib.sha256()
    for _ in range(BIG_BLOCKS):
        digest.update(block)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_BLOCK * BIG_BLOCKS))
            self.end_headers()
            try:
                for _ in range(BIG_BLOCKS):
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/big.gguf", digest.hexdigest()
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_the_api_answers_at_once_while_a_large_pull_writes_hashes_and_fsyncs(
        hal0_factory: Any, big_file_server: tuple[str, str]) -> None:
    url, digest = big_file_server
    h: Hal0 = hal0_factory(None).start()
    resp = h.client.post("/api/models/pull", json={"ref": "big-pull", "source": url, "sha256": digest})
    assert resp.status_code == 202, resp.text
    # Every health request gets its answer (a stalled loop would hold one for as long as it stalls), many
    # of them while the pull is still writing, hashing or syncing the file.
    answered_while_pulling = 0
    slowest = 0.0
    with httpx.Client(base_url=h.url, timeout=5) as client:
        while True:
            started = time.monotonic()
            health = client.get("/api/health")
            slowest = max(slowest, time.monotonic() - started)
            assert health.status_code == 200
            if "big-pull" not in client.get("/api/models").json()["pulling"]:
                break
            answered_while_pulling += 1
    assert answered_while_pulling >= 5, answered_while_pulling
    manifest = h.client.get("/api/models/big-pull").json()
    assert manifest["files"][0]["sha256"] == digest and manifest["size"] == BIG_BLOCK * BIG_BLOCKS, manifest
    print(f"\n{answered_while_pulling} health answers during a {BIG_BLOCKS} MiB pull, slowest {slowest * 1000:.0f} ms")


# -- a loading backend whose log never says it is up -------------------------------------------------------------
def test_a_backend_whose_log_never_says_it_loaded_is_still_found_ready(hal0_factory: Any, llama_server: str,
                                                                       model_files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """While llama-server answers "loading", the next probe waits for a log line that says it may be up
    (`ready_lines`); one that never logs such a line (another version, its own wording) is still found ready
    by the probing backoff, and answers."""
    wrapper = tmp_path / "llama-server"
    # The real server, its log rewritten on the way to the slot's log: the ready lines never appear.
    wrapper.write_text(f'#!/bin/sh\n"{llama_server}" "$@" 2>&1 | sed -u -e "s/model loaded/model up/" '
                       '-e "s/listening/serving/" -e "s/all slots are idle/idle/"\n')
    wrapper.chmod(0o755)
    h = ready_primary(hal0_factory(str(wrapper)), model_files)
    log = (h.home / "logs" / "slots" / "primary.log").read_text()
    assert "model up" in log and "model loaded" not in log and "listening" not in log
    assert chat(h).status_code == 200
