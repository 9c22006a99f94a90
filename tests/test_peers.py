"""Peers: settings, the choice of a peer's slot, following a real peer's event stream, the hop mark, and
refusing a peer on another host without a key. Multi-node routing with real llama-server is in
tests/test_peers_netns.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hal0.dispatch.resolve import resolve_remote
from hal0.errors import ConfigError
from hal0.events import EventBus
from hal0.peers.follow import Peers
from hal0.peers.forward import HOP_HEADER
from hal0.peers.view import PeerStatus, PeerView, RemoteSlot
from hal0.settings import PeerConfig, load_settings, parse_peers
from tests.conftest import Hal0, wait_until

# -- settings ---------------------------------------------------------------------------------------------


def test_peers_from_the_environment_take_url_hash_key(tmp_path: Path) -> None:
    s = load_settings(env={"HAL0_HOME": str(tmp_path),
                           "HAL0_PEERS": "http://10.0.0.2:8080#k2, http://127.0.0.1:9000/,https://[fd00::3]:8443#k3"})
    assert [(p.url, p.api_key) for p in s.peers] == [
        ("http://10.0.0.2:8080", "k2"), ("http://127.0.0.1:9000", ""), ("https://[fd00::3]:8443", "k3")]
    assert "k2" not in repr(s.peers)


def test_peers_from_hal0_toml_are_urls_or_tables(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "hal0.toml").write_text(
        '[[peers]]\nurl = "http://10.0.0.2:8080"\napi_key = "secret"\n\n'
        '[[peers]]\nurl = "http://localhost:8090"\n')
    s = load_settings(env={"HAL0_HOME": str(tmp_path)})
    assert s.peers == (PeerConfig("http://10.0.0.2:8080", "secret"), PeerConfig("http://localhost:8090"))
    assert parse_peers(["http://127.0.0.1:1"]) == (PeerConfig("http://127.0.0.1:1"),)
    # The environment replaces the file's list, like every other setting.
    s = load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PEERS": "http://127.0.0.1:7000"})
    assert s.peers == (PeerConfig("http://127.0.0.1:7000"),)


@pytest.mark.parametrize("value, message", [
    ("http://10.0.0.2:8080", "not on this machine and has no API key"),
    ("http://nas.local:8080", "not on this machine and has no API key"),
    ("ftp://127.0.0.1:21", "must be a base URL"),
    ("http://127.0.0.1:8080/v1", "must be a base URL"),
    ("http://user:pw@127.0.0.1:8080", "must be a base URL"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:1,http://127.0.0.1:1/", "listed twice"),
])
def test_bad_peers_are_refused_with_the_reason(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PEERS": value})


def test_a_peer_table_with_unknown_fields_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only `url` and `api_key`"):
        parse_peers([{"url": "http://127.0.0.1:1", "key": "x"}])


def test_serve_refuses_a_peer_on_another_host_without_a_key(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hal0.cli", "serve", "--no-demo"], capture_output=True, text=True, timeout=60,
        env={"HAL0_HOME": str(tmp_path), "HAL0_PEERS": "http://10.231.0.9:8080", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)})
    assert done.returncode == 1
    assert "peer http://10.231.0.9:8080 is not on this machine and has no API key" in done.stderr
    assert "[config_error]" in done.stderr


# -- choosing a peer's slot -------------------------------------------------------------------------------
def remote(node: str, name: str, model: str | None, state: str = "offline", type_: str = "chat",
           aliases: tuple[str, ...] = ()) -> RemoteSlot:
    return RemoteSlot(node=node, name=name, type=type_, model=model, aliases=aliases, state=state, seq=1)


def test_a_ready_peer_comes_before_a_cold_one_then_the_configured_order() -> None:
    slots = [remote("http://a", "primary", "qwen", "offline"), remote("http://b", "primary", "qwen", "ready"),
             remote("http://c", "chat2", "qwen", "serving"), remote("http://d", "x", "qwen", "error"),
             remote("http://e", "y", "qwen", "offline")]
    picks = resolve_remote(slots, "qwen", "/v1/chat/completions")
    assert [p.slot.node for p in picks] == ["http://b", "http://c", "http://a", "http://e", "http://d"]
    assert picks[0].why == "peer http://b has it ready (slot primary, by ref)"
    assert picks[0].to_dict()["node"] == "http://b"


def test_peer_slots_of_the_wrong_type_or_without_a_model_are_no_candidates() -> None:
    slots = [remote("http://a", "embed", "qwen", "ready", type_="embed"), remote("http://b", "qwen", None),
             remote("http://c", "big", "llama-70b", aliases=("qwen",))]
    picks = resolve_remote(slots, "qwen", "/v1/chat/completions")
    assert [(p.slot.node, p.matched_by) for p in picks] == [("http://c", "alias")]
    assert [p.slot.node for p in resolve_remote(slots, "qwen", "/v1/embeddings")] == ["http://a"]
    assert resolve_remote(slots, "nothing", "/v1/chat/completions") == []


def test_a_peer_that_could_not_be_reached_just_now_is_tried_last() -> None:
    slots = [remote("http://a", "primary", "qwen", "ready"), remote("http://b", "primary", "qwen", "offline")]
    picks = resolve_remote(slots, "qwen", "/v1/chat/completions", avoid=frozenset({"http://a"}))
    assert [p.slot.node for p in picks] == ["http://b", "http://a"]
    view = PeerView(PeerConfig("http://a"))
    view.note_unreachable()
    assert view.avoided and view.to_dict()["avoided"]
    view.note_reachable()
    assert not view.avoided


# -- a peer's view ----------------------------------------------------------------------------------------
def record(name: str, state: str, seq: int, model: str | None = "m") -> dict[str, Any]:
    return {"name": name, "state": state, "seq": seq, "type": "chat",
            "config": {"model": model, "aliases": ["al"], "type": "chat"}}


def test_a_snapshot_then_events_in_seq_order_and_down_forgets_everything() -> None:
    view = PeerView(PeerConfig("http://127.0.0.1:1"))
    assert view.status is PeerStatus.CONNECTING
    view.apply_snapshot([record("primary", "ready", 7), {"not": "a slot"}])
    assert view.up and view.slots["primary"].state == "ready" and view.slots["primary"].aliases == ("al",)
    # A transition from before the snapshot (replayed after a resume) does not undo it.
    assert not view.apply_event({"id": 3, "slot": "primary", "from": "warming", "to": "ready",
                                 "seq": 5, "record": record("primary", "warming", 5)})
    assert view.slots["primary"].state == "ready" and view.last_event_id == 3
    assert view.apply_event({"id": 4, "slot": "primary", "seq": 8, "record": record("primary", "serving", 8)})
    assert view.slots["primary"].state == "serving"
    # Config changes keep the seq and always apply.
    assert view.apply_event({"id": 5, "slot": "primary", "event": "updated",
                             "record": record("primary", "serving", 8, model="other")})
    assert view.slots["primary"].model == "other"
    assert view.apply_event({"id": 6, "slot": "primary", "event": "deleted"})
    assert "primary" not in view.slots
    view.apply_snapshot([record("primary", "ready", 9)])
    assert view.mark_down("gone") and not view.up and view.slots == {} and view.reason == "gone"
    assert not view.mark_down("still gone")


# -- following a real peer ----------------------------------------------------------------------------------
async def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_peer_is_followed_live_and_marked_down_when_its_api_dies(hal0_factory: Any,
                                                                         tmp_path: Path) -> None:
    peer: Hal0 = hal0_factory().start()
    bus = EventBus()
    events = bus.subscription(["peer"])
    async with Peers(parse_peers(peer.url), bus) as peers:
        view = peers.views[peer.url]
        await wait_for(lambda: view.up, "the peer to be up")
        assert {s.name for s in peers.remote_slots()} == {"primary", "embed", "stt", "tts"}
        # A change on the peer arrives through its event stream.
        created = peer.client.post("/api/slots", json={"name": "extra", "type": "chat", "aliases": ["xl"]})
        assert created.status_code == 201, created.text
        await wait_for(lambda: "extra" in view.slots, "the new slot to be seen")
        assert view.slots["extra"].aliases == ("xl",)
        first = view.connects
        peer.kill()
        await wait_for(lambda: view.status is PeerStatus.DOWN, "the peer to be marked down")
        assert peers.remote_slots() == [] and view.reason
        statuses = []
        while (event := await events.get(0)) is not None:
            statuses.append(event.data["status"])
        assert statuses[0] == "up" and statuses[-1] == "down"
        # Back on the same port: the follower reconnects by itself and takes a fresh snapshot.
        peer.start()
        await wait_for(lambda: view.up and view.connects > first, "the peer to be followed again")
        assert "extra" in view.slots


async def test_a_peer_that_refuses_the_key_is_down_with_the_reason(hal0_factory: Any) -> None:
    peer: Hal0 = hal0_factory().start(env={"HAL0_API_KEYS": "right"})
    async with Peers((PeerConfig(peer.url, "wrong"),), EventBus()) as peers:
        view = peers.views[peer.url]
        await wait_for(lambda: view.status is PeerStatus.DOWN, "the peer to be marked down")
        assert "HTTP 401" in view.reason and "invalid_api_key" in view.reason


def test_a_forwarded_request_is_never_forwarded_again(hal0_factory: Any, model_files: dict[str, Path]) -> None:
    """Two nodes that list each other: a request that already took one hop for a model the node does not serve
    itself is model_not_found, even though its peer serves it; the node neither forwards nor loads anything."""
    a: Hal0 = hal0_factory()
    b: Hal0 = hal0_factory()
    b.add_model("only-on-b", model_files["tiny"])
    b.write_slot_config("chatb", 'type = "chat"\nmodel = "only-on-b"\n')
    a.start(env={"HAL0_PEERS": b.url})
    b.start(env={"HAL0_PEERS": a.url})
    wait_until(lambda: any(m["id"] == "only-on-b" for m in a.client.get("/v1/models").json()["data"]), 30,
               "node a to list b's model")
    listed = next(m for m in a.client.get("/v1/models").json()["data"] if m["id"] == "only-on-b")
    assert (listed["owned_by"], listed["node"], listed["slot"]) == (b.url, b.url, "chatb")
    assert a.client.get("/v1/models/only-on-b").json()["node"] == b.url
    body = {"model": "only-on-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    # A request that was forwarded once (to a, which lists b) is not forwarded on.
    resp = a.client.post("/v1/chat/completions", json=body, headers={HOP_HEADER: "1"})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "model_not_found"
    # Neither is a hop to b for a model only a would have: b answers itself.
    resp = b.client.post("/v1/chat/completions", json={**body, "model": "nowhere"}, headers={HOP_HEADER: "1"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert b.slot("chatb")["state"] == "offline"
    assert not [d for d in b.client.get("/api/decisions").json()["data"] if d.get("peer")]
