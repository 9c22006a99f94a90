"""Several real hal0 nodes, one per network namespace, with real llama-server: requests routed across nodes
with the openai client, a peer killed mid-stream, failover to another peer with the same model, no loop
between two nodes that list each other, and one model split over two nodes with llama.cpp's RPC backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from hal0.registry.generate import TINY, generate_gguf
from tests.conftest import wait_until
from tests.netns import Lab, Node, netns_unavailable

pytestmark = [pytest.mark.llama, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def lab() -> Iterator[Lab]:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def nodes(lab: Lab, tmp_path: Path, llama_server: str) -> Iterator[Callable[[str], Node]]:
    made: list[Node] = []

    def make(key: str) -> Node:
        ns = lab.add()
        node = Node(ns, tmp_path / ns.name, llama_server, key)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def client(node: Node, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.key, max_retries=0, timeout=timeout)


def chat(node: Node, model: str, **kw: Any) -> str:
    """One greedy chat completion through `node`, from inside its namespace."""
    def call() -> str:
        with client(node) as c:
            reply = c.chat.completions.create(model=model, messages=PROMPT, max_tokens=kw.pop("max_tokens", 8),
                                              temperature=0, seed=7, **kw)
        return reply.choices[0].message.content or ""
    return node.ns.call(call)


def forwarded(node: Node, model: str, count: int = 0) -> list[dict[str, Any]]:
    """The decision records of `model` on `node`, newest first, once there are at least `count` (a record is
    written as its response ends, so a client may see the response an instant before it)."""
    def found() -> list[dict[str, Any]] | None:
        records = [d for d in node.decisions() if d["model"] == model]
        return records if len(records) >= count else None
    return wait_until(found, 10, f"{count} decision records of {model}") if count else found() or []


def test_requests_route_across_nodes_and_fail_over_when_a_peer_dies(nodes: Callable[[str], Node],
                                                                     tmp_path: Path) -> None:
    a, b, c = nodes("key-a"), nodes("key-b"), nodes("key-c")
    # The tiny model with a long context: two answers in flight at once must outlast the kill below, and
    # llama-server caps an answer at the context the model was trained for (the tiny one's 2048 tokens go by
    # in well under a second).
    long = generate_gguf(tmp_path / "long.gguf", replace(TINY, context=131072, name="hal0-tiny-long"))
    for peer in (b, c):
        peer.add_model("tiny-shared", long)
        peer.write_slot("primary", 'model = "tiny-shared"\nctx_size = 131072\n')
        peer.start()
    a.start(peers=[b, c])
    wait_until(lambda: [p["status"] for p in a.peers().values()] == ["up", "up"], 30, "a to follow b and c")

    # /v1/models on a lists the peers' model with the node that serves it.
    listed = a.ns.call(lambda: [m.to_dict() for m in client(a).models.list()])
    remote = [(m["id"], m["owned_by"], m["node"]) for m in listed if m["id"] == "tiny-shared"]
    assert remote == [("tiny-shared", b.url, b.url), ("tiny-shared", c.url, c.url)]

    # Both cold: the first configured peer takes it, and loads it; then it is the ready one.
    first = chat(a, "tiny-shared")
    assert isinstance(first, str)
    record = forwarded(a, "tiny-shared", 1)[0]
    assert record["peer"] == b.url and record["slot"] == "primary" and record["outcome"] == "ok"
    assert "no local slot (model_not_found)" in record["reason"] and "offline" in record["reason"]
    assert {x.get("node") for x in record["candidates"]} == {b.url, c.url}
    wait_until(lambda: any(s["slot"] == "primary" and s["state"] == "ready" for s in a.peers()[b.url]["slots"]),
               30, "a to see b's primary ready")
    assert chat(a, "tiny-shared") == first  # greedy, same node, same answer
    record = forwarded(a, "tiny-shared", 2)[0]
    assert record["peer"] == b.url and f"peer {b.url} has it ready" in record["reason"]
    # b answered locally and did not forward: its record names no peer.
    assert [d["peer"] for d in forwarded(b, "tiny-shared", 2)] == [None, None]

    # Streamed through a, chunk by chunk.
    def stream() -> list[str]:
        with client(a) as cl:
            return [ch.choices[0].delta.content or "" for ch in cl.chat.completions.create(
                model="tiny-shared", messages=PROMPT, max_tokens=24, temperature=0, stream=True) if ch.choices]
    pieces = a.ns.call(stream)
    assert len([p for p in pieces if p]) > 1

    # A long stream and a long non-streamed completion through a; b's API is killed while both are in flight:
    # each client gets a clean, OpenAI-shaped error.
    started = threading.Event()

    def long_stream() -> tuple[int, Exception | None]:
        count = 0
        try:
            with client(a) as cl:
                for _ in cl.chat.completions.create(model="tiny-shared", messages=PROMPT, max_tokens=60000,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    count += 1
                    started.set()
        except (openai.APIError, openai.APIConnectionError) as exc:
            return count, exc
        return count, None

    def long_plain() -> Exception | None:
        try:
            with client(a) as cl:
                cl.completions.create(model="tiny-shared", prompt="hello", max_tokens=60000, temperature=0,
                                      extra_body={"ignore_eos": True})
        except openai.APIError as exc:
            return exc
        return None

    future = a.ns.submit(long_stream)
    assert started.wait(60)
    plain = a.ns.submit(long_plain)
    wait_until(lambda: b.get("/api/slots/primary").json()["in_flight"] >= 2, 30, "both requests in flight on b")
    b.kill()
    killed = time.monotonic()
    wait_until(lambda: a.peers()[b.url]["status"] == "down", 10, "a to mark b down")
    noticed = time.monotonic() - killed
    count, error = future.result(60)
    assert isinstance(error, openai.APIError), (count, error)
    assert f"peer {b.url} (slot primary) failed mid-stream" in str(error)
    plain_error = plain.result(60)
    assert isinstance(plain_error, openai.APIStatusError), plain_error
    assert plain_error.status_code == 502 and plain_error.code == "peer_failed"
    assert f"peer {b.url} (slot primary) failed before it answered" in plain_error.message
    print(f"b marked down {noticed * 1000:.0f} ms after its API was killed; the stream ended after {count} chunks")
    assert a.peers()[b.url]["slots"] == [] and a.peers()[b.url]["reason"]
    broken = forwarded(a, "tiny-shared", 5)[:2]
    assert {d["outcome"] for d in broken} == {"backend_failed", "rejected:peer_failed"}
    assert {d["peer"] for d in broken} == {b.url}

    # b's model is no longer offered by b; c serves the same ref, so requests fail over to it.
    listed = a.ns.call(lambda: [m.to_dict() for m in client(a).models.list()])
    assert [(m["id"], m["node"]) for m in listed if m["id"] == "tiny-shared"] == [("tiny-shared", c.url)]
    assert chat(a, "tiny-shared") == first
    assert forwarded(a, "tiny-shared", 6)[0]["peer"] == c.url

    # With every peer down, the model is simply not found.
    c.kill()
    wait_until(lambda: a.peers()[c.url]["status"] == "down", 10, "a to mark c down")
    with pytest.raises(openai.NotFoundError) as refused:
        chat(a, "tiny-shared")
    assert refused.value.code == "model_not_found"


def test_a_peer_whose_new_connections_fail_is_passed_over_for_the_next(nodes: Callable[[str], Node],
                                                                         model_files: dict[str, Path]) -> None:
    """b's event stream is open, so b looks up, but a new connection to b fails (its route is gone): the request
    goes to c, which serves the same ref, before anything was sent to b."""
    a, b, c = nodes("key-a"), nodes("key-b"), nodes("key-c")
    for peer in (b, c):
        peer.add_model("tiny-shared", model_files["tiny"])
        peer.write_slot("primary", 'model = "tiny-shared"\n')
        peer.start()
    a.start(peers=[b, c])
    wait_until(lambda: [p["status"] for p in a.peers().values()] == ["up", "up"], 30, "a to follow b and c")
    a.ns.cut_route(b.ns.address)
    assert chat(a, "tiny-shared")
    record = forwarded(a, "tiny-shared", 1)[0]
    assert record["peer"] == c.url and record["outcome"] == "ok"
    assert f"after {b.url} did not take the connection" in record["reason"]
    assert a.peers()[b.url]["status"] == "up"  # only new connections fail: its stream is fine
    # For a while b is tried last: the next request goes straight to c.
    assert a.peers()[b.url]["avoided"]
    assert chat(a, "tiny-shared")
    record = forwarded(a, "tiny-shared", 2)[0]
    assert record["peer"] == c.url and "did not take the connection" not in record["reason"]


def test_two_nodes_that_list_each_other_route_without_a_loop(nodes: Callable[[str], Node],
                                                             model_files: dict[str, Path]) -> None:
    a, b = nodes("key-a"), nodes("key-b")
    a.add_model("tiny-a", model_files["tiny"])
    a.write_slot("primary", 'model = "tiny-a"\n')
    b.add_model("tiny-b", model_files["tiny"])
    b.write_slot("primary", 'model = "tiny-b"\n')
    # Each lists the other; a starts first, so it follows b once b is up (reconnect with backoff).
    a.start(peers=[b])
    b.start(peers=[a])
    wait_until(lambda: a.peers()[b.url]["status"] == "up" and b.peers()[a.url]["status"] == "up", 30,
               "both nodes to follow each other")
    # `hal0 peers` shows them, through the same API.
    shown = subprocess.run(["ip", "netns", "exec", a.ns.name, sys.executable, "-m", "hal0.cli", "peers",
                            "--url", a.url], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "HAL0_HOME": str(a.home), "HAL0_API_KEYS": a.key})
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith(b.url))
    assert row.split()[1] == "up" and "tiny-b" in row
    assert chat(a, "tiny-b") == chat(b, "tiny-b")
    assert chat(b, "tiny-a") == chat(a, "tiny-a")
    # Newest first: the request through the other node is the oldest record of each.
    assert forwarded(a, "tiny-b", 1)[-1]["peer"] == b.url and forwarded(b, "tiny-a", 1)[-1]["peer"] == a.url

    # A model neither serves: a answers 404 itself, and nothing reaches b.
    with pytest.raises(openai.NotFoundError) as refused:
        chat(a, "ghost")
    assert refused.value.code == "model_not_found"
    assert forwarded(b, "ghost") == []
    # A forwarded request for a model the receiver does not serve is not forwarded back.
    resp = b.post("/v1/chat/completions", json={"model": "tiny-a", "messages": PROMPT, "max_tokens": 1},
                  headers={"X-Hal0-Hop": "1"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert forwarded(b, "tiny-a", 2)[0]["outcome"] == "rejected:model_not_found"
    assert len(forwarded(a, "tiny-a")) == 2  # a's own request and b's forward earlier, nothing new


def test_one_model_split_over_two_nodes_answers_like_one_node(nodes: Callable[[str], Node],
                                                               model_files: dict[str, Path]) -> None:
    """An `rpc` slot on one node lends its CPU to a chat slot on another (`rpc = [...]`, one block and the
    output layer offloaded): greedy output equals the same model on one node. The main slot waits for its
    worker, and fails naming it when the worker dies."""
    worker, main = nodes("key-w"), nodes("key-m")
    endpoint = f"{worker.ns.address}:50052"
    worker.write_slot("worker", f'type = "rpc"\nhost = "{worker.ns.address}"\nport = 50052\n')
    main.add_model("tiny", model_files["tiny"])
    # -ngl 2 of the model's 3 layers (2 blocks and the output): one block and the output go to the worker, one
    # block stays local. -lv 4 makes llama-server report where its buffers went.
    main.write_slot("primary", f'model = "tiny"\nargs = ["-ngl", "2", "-lv", "4"]\nrpc = ["{endpoint}"]\n')
    main.write_slot("single", 'model = "tiny"\n')
    worker.start()
    main.start()

    # The worker is not loaded yet: the main slot does not start a llama-server that cannot reach it.
    refused = main.post("/v1/chat/completions", json={"model": "primary", "messages": PROMPT, "max_tokens": 4})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "rpc_worker_unreachable"
    assert endpoint in refused.json()["error"]["message"]

    loaded = worker.post("/api/slots/worker/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "ready" and loaded.json()["model"] is None
    assert "NO authentication" in worker.log.read_text()  # the loud warning for a non-loopback worker

    split = chat(main, "primary", max_tokens=16)
    single = chat(main, "single", max_tokens=16)
    assert split and split == single
    assert "Accepted client connection" in (worker.home / "logs" / "slots" / "worker.log").read_text()
    placed = (main.home / "logs" / "slots" / "primary.log").read_text()
    assert f"RPC0[{endpoint}] model buffer size" in placed and "offloading 1 repeating layers" in placed
    assert main.get("/api/slots/primary").json()["state"] in ("ready", "serving")

    # A worker serves one llama-server at a time: a second slot that names it does not start while it is held.
    made = main.post("/api/slots", json={"name": "second", "type": "chat", "model": "tiny", "rpc": [endpoint]})
    assert made.status_code == 201, made.text
    busy = main.post("/v1/chat/completions", json={"model": "second", "messages": PROMPT, "max_tokens": 4})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "rpc_worker_unreachable"
    assert endpoint in busy.json()["error"]["message"] and "busy" in busy.json()["error"]["message"]

    # The worker dies: the main slot goes to error, and the reason names the worker.
    os.kill(worker.get("/api/slots/worker").json()["pid"], signal.SIGKILL)
    state = wait_until(lambda: (s := main.get("/api/slots/primary").json())["state"] == "error" and s, 30,
                       "the main slot to fail with its worker")
    assert state["error"]["code"] == "rpc_worker_gone"
    assert f"rpc worker {endpoint}" in state["error"]["message"]
