"""The /v1 edge, end to end: the official openai client and raw HTTP against the real hal0 API with real
llama-server slots. Resolution, cold boot, single-flight, coalescing, cancellation, failures, decision records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Hal0, backend_pids, wait_until

pytestmark = pytest.mark.llama

PROMPT = [{"role": "user", "content": "hello"}]
CHAT_ALIASES = ["gpt-4o-mini", "team/chat"]


# -- helpers ------------------------------------------------------------------------------------------------
def client(hal0: Hal0, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hal0.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def async_client(hal0: Hal0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{hal0.url}/v1", api_key="unused", max_retries=0, timeout=60)


def decisions(hal0: Hal0, count: int = 0, **query: Any) -> list[dict[str, Any]]:
    """Recent decision records, newest first; waits (with a deadline) until there are at least `count`.

    A record is appended as its response ends, so the client can see the response an instant before the record.
    """
    def fetch() -> list[dict[str, Any]]:
        resp = hal0.client.get("/api/decisions", params={"limit": 2000, **query})
        assert resp.status_code == 200, resp.text
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    if count == 0:
        return fetch()
    def enough() -> list[dict[str, Any]] | None:
        data = fetch()
        return data if len(data) >= count else None

    found: list[dict[str, Any]] = wait_until(enough, 10, f"{count} decision records")
    return found


def decision_for(hal0: Hal0, request_id: str) -> dict[str, Any]:
    record: dict[str, Any] = wait_until(
        lambda: next((d for d in decisions(hal0) if d["request_id"] == request_id), None), 10,
        f"the decision record of {request_id}")
    return record


def openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The error object of a response, after checking the status and OpenAI's error shape."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error", "server_error", "authentication_error")
    if code is not None:
        assert err["code"] == code, err
    assert resp.headers["x-request-id"]
    return err


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    frame: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                event: dict[str, Any] = json.loads("\n".join(data))
                event.update({f"sse_{k}": v for k, v in frame.items()})
                yield event
            frame, data = {}, []
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            if key == "data":
                data.append(value.removeprefix(" "))
            else:
                frame[key] = value.removeprefix(" ")


@contextlib.contextmanager
def event_stream(hal0: Hal0, topics: str) -> Iterator[Iterator[dict[str, Any]]]:
    """/api/events from the start of the replay ring, then live; a read that waits 15 s fails, not hangs."""
    with (httpx.Client(base_url=hal0.url, timeout=15) as http,
          http.stream("GET", "/api/events", params={"topics": topics}, headers={"Last-Event-ID": "0"}) as resp):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield sse_events(resp.iter_lines())


def read_until(events: Iterator[dict[str, Any]], done: Callable[[dict[str, Any]], bool],
               timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    out = []
    for event in events:
        out.append(event)
        if done(event):
            return out
        assert time.monotonic() < deadline, f"timed out after {timeout}s; events so far: {out}"
    raise AssertionError(f"event stream ended early after {out}")


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(state in it for state in wanted)


def backend_slots(port: int) -> list[dict[str, Any]]:
    """llama-server's own /slots view: which of its parallel slots is generating, for which task."""
    resp = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=10)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()
    return data


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny(hal0: Hal0, model_files: dict[str, Path]) -> Hal0:
    """hal0 with `primary` (tiny chat model, two aliases) and the built-in `embed` slot assigned the generated
    embed model; both cold.
    """
    hal0.add_model("tiny", model_files["tiny"])
    hal0.add_model("tiny-embed", model_files["embed"], slot_type="embed")
    hal0.write_slot_config("primary", f'type = "chat"\nmodel = "tiny"\naliases = {json.dumps(CHAT_ALIASES)}\n')
    hal0.start()
    resp = hal0.client.put("/api/slots/embed/model", json={"model": "tiny-embed"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "embed"
    return hal0


@pytest.fixture(scope="module")
def big(llama_server: str, large_model: Path, model_files: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hal0]:
    """One hal0 for the tests that need the large model (about 2 s to load, about 40 tokens/s): slot `big`.

    Shared by the module to keep the suite fast; each test brings the slot to the state it needs.
    """
    hal0 = Hal0(tmp_path_factory.mktemp("big") / "home", llama_server)
    hal0.models.import_file("large", large_model, slot_type="chat", link=True)
    hal0.write_slot_config("big", 'type = "chat"\nmodel = "large"\n')
    hal0.start()
    yield hal0
    hal0.stop()
    hal0.kill_backends()
    hal0.client.close()


def ensure_ready(hal0: Hal0, slot: str) -> dict[str, Any]:
    resp = hal0.client.post(f"/api/slots/{slot}/load")
    assert resp.status_code == 200, resp.text
    view: dict[str, Any] = resp.json()
    assert view["state"] == "ready", view
    return view


# -- the openai client against real backends ----------------------------------------------------------------
def test_openai_client_chat_streamed_and_not_completions_and_embeddings(tiny: Hal0) -> None:
    oai = client(tiny)

    chat = oai.chat.completions.create(model="primary", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8

    stream = oai.chat.completions.create(model="primary", messages=PROMPT, max_tokens=8,  # type: ignore[arg-type]
                                         stream=True)
    chunks = list(stream)
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    completion = oai.completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason in ("length", "stop")

    one = oai.embeddings.create(model="embed", input="hello")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 64
    two = oai.embeddings.create(model="tiny-embed", input=["hello", "world"])
    assert [d.index for d in two.data] == [0, 1]
    assert two.data[0].embedding != two.data[1].embedding

    by_endpoint = {d["endpoint"]: d for d in decisions(tiny, 5, outcome="ok")}
    assert by_endpoint["/v1/chat/completions"]["slot"] == "primary"
    assert by_endpoint["/v1/completions"]["reason"] == "ref"
    assert by_endpoint["/v1/embeddings"]["slot"] == "embed"


def test_responses_and_messages_pass_through_to_llama_server(tiny: Hal0) -> None:
    responses = tiny.client.post("/v1/responses", json={"model": "primary", "input": "hello",
                                                        "max_output_tokens": 4})
    assert responses.status_code == 200, responses.text
    assert responses.json()["object"] == "response"

    messages = tiny.client.post("/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 4,
                                                      "messages": PROMPT})
    assert messages.status_code == 200, messages.text
    body = messages.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["stop_reason"] in ("max_tokens", "end_turn")


def test_models_lists_every_routable_model_with_its_slot_and_live_state(tiny: Hal0) -> None:
    oai = client(tiny)
    listed = {m.id: m.model_extra or {} for m in oai.models.list()}
    assert set(listed) == {"tiny", "tiny-embed"}  # unassigned built-ins (stt, tts) route nowhere
    assert listed["tiny"]["slot"] == "primary"
    assert listed["tiny"]["state"] == "offline"
    assert set(CHAT_ALIASES) <= set(listed["tiny"]["aliases"])
    assert listed["tiny-embed"]["slot"] == "embed"
    assert listed["tiny-embed"]["type"] == "embed"

    oai.embeddings.create(model="embed", input="x")
    listed = {m.id: m.model_extra or {} for m in oai.models.list()}
    assert listed["tiny-embed"]["state"] == "ready"
    assert listed["tiny"]["state"] == "offline"


def test_aliases_from_the_slot_config_route_to_the_slot(tiny: Hal0) -> None:
    oai = client(tiny)
    for alias in CHAT_ALIASES:
        chat = oai.chat.completions.create(model=alias, messages=PROMPT, max_tokens=2)  # type: ignore[arg-type]
        assert chat.choices[0].message.role == "assistant"
    routed = [d for d in decisions(tiny, 2, endpoint="/v1/chat/completions") if d["model"] in CHAT_ALIASES]
    assert len(routed) == 2
    assert all(d["slot"] == "primary" and d["reason"].split(",")[0] == "alias" for d in routed)
    assert all(d["candidates"][0]["matched_by"] == "alias" for d in routed)


def test_request_id_is_echoed_or_assigned_and_the_proxy_adds_no_duplicate_headers(tiny: Hal0) -> None:
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 2}
    echoed = tiny.client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "req-42.a"})
    assert echoed.status_code == 200, echoed.text
    assert echoed.headers.get_list("x-request-id") == ["req-42.a"]
    assert decision_for(tiny, "req-42.a")["status"] == 200

    assigned = tiny.client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "bad id\t!"})
    rid = assigned.headers["x-request-id"]
    assert rid != "bad id\t!" and len(rid) >= 16
    assert decision_for(tiny, rid)["status"] == 200

    # hal0's own server writes these; the backend's copies must not be forwarded too.
    for name in ("server", "date", "connection", "transfer-encoding"):
        assert len(assigned.headers.get_list(name)) <= 1, (name, assigned.headers)
    assert "keep-alive" not in {k.lower() for k in assigned.headers}

    rejected = tiny.client.post("/v1/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "r-9"})
    assert rejected.headers["x-request-id"] == "r-9"


# -- errors -------------------------------------------------------------------------------------------------
def test_every_error_path_has_openai_error_shape(tiny: Hal0) -> None:
    http = tiny.client
    err = openai_error(http.post("/v1/nope", json={"model": "primary"}), 404, "unknown_endpoint")
    assert err["type"] == "not_found_error"
    openai_error(http.get("/v1/chat"), 404, "unknown_endpoint")
    openai_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")

    openai_error(http.post("/v1/chat/completions", json={"messages": PROMPT}), 400, "missing_model")
    openai_error(http.post("/v1/embeddings", content=b""), 400, "missing_model")
    openai_error(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}), 400, "missing_model")
    openai_error(http.post("/v1/audio/speech", json={"input": "hi"}), 400, "missing_model")
    openai_error(http.post("/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"}), 400, "invalid_json")
    openai_error(http.post("/v1/chat/completions", json={"model": 7}), 400, "invalid_model")

    unknown = openai_error(http.post("/v1/chat/completions", json={"model": "gpt-9"}), 404, "model_not_found")
    assert unknown["type"] == "not_found_error"
    for name in ("primary", "tiny", "embed", "tiny-embed", *CHAT_ALIASES):
        assert name in unknown["message"]
        assert name in unknown["detail"]["available"]
    openai_error(http.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["d"]}),
                 404, "model_not_found")
    openai_error(http.post("/v1/reranking", json={"model": "reranker"}), 404, "model_not_found")

    wrong = openai_error(http.post("/v1/embeddings", json={"model": "primary", "input": "x"}), 400,
                         "wrong_slot_type")
    assert "chat slot" in wrong["message"] and "embed" in wrong["message"]
    openai_error(http.post("/v1/chat/completions", json={"model": "embed", "messages": PROMPT}), 400,
                 "wrong_slot_type")
    openai_error(http.post("/v1/audio/transcriptions", data={"model": "primary"},
                           files={"file": ("a.wav", b"RIFF")}), 400, "wrong_slot_type")

    # The built-in stt slot exists but has no model: a conflict that says how to fix it.
    no_model = openai_error(http.post("/v1/audio/transcriptions", data={"model": "stt"},
                                      files={"file": ("a.wav", b"RIFF")}), 409, "no_model")
    assert "hal0 slot assign stt" in no_model["message"]

    # The backend's own 4xx reaches the client with its message, in the same error shape.
    upstream = http.post("/v1/chat/completions", json={"model": "primary", "messages": "not a list"},
                         headers={"X-Request-Id": "up-4xx"})
    assert 400 <= upstream.status_code < 500, upstream.text
    assert isinstance(upstream.json()["error"]["message"], str)
    assert decision_for(tiny, "up-4xx")["outcome"] == "upstream_error"

    # The openai client turns them into its typed exceptions.
    oai = client(tiny)
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="gpt-9", messages=PROMPT)  # type: ignore[arg-type]
    assert isinstance(not_found.value.body, dict) and not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.embeddings.create(model="primary", input="x", extra_headers={"X-Request-Id": "last-bad"})
    assert isinstance(bad.value.body, dict) and bad.value.body["code"] == "wrong_slot_type"
    decision_for(tiny, "last-bad")

    rejected = [d for d in decisions(tiny) if d["outcome"].startswith("rejected:")]
    assert {d["outcome"] for d in rejected} >= {"rejected:missing_model", "rejected:model_not_found",
                                                "rejected:wrong_slot_type", "rejected:no_model"}
    assert all(d["status"] >= 400 and d["error"]["message"] for d in rejected)


def test_an_oversized_body_is_refused_with_413(hal0: Hal0) -> None:
    hal0.start(env={"HAL0_MAX_BODY_BYTES": "4096"})
    big_body = {"model": "primary", "messages": [{"role": "user", "content": "x" * 8000}]}
    openai_error(hal0.client.post("/v1/chat/completions", json=big_body), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b'{"model": "primary", "input": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    openai_error(hal0.client.post("/v1/embeddings", content=chunks()), 413, "body_too_large")


def _mapped(pid: int, fragment: str) -> bool:
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def test_v1_is_served_before_the_management_app_is_imported(hal0: Hal0, model_files: dict[str, Path]) -> None:
    """A (re)started API answers /v1 (a cold load included) and its liveness check without importing the
    management app; the first /api request builds it. pydantic-core's shared object, which only the management
    app's body models bring in, tells from outside the process."""
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("primary", 'type = "chat"\nmodel = "tiny"\n')
    hal0.start()
    assert hal0.proc is not None
    answer = client(hal0).chat.completions.create(model="primary", max_tokens=2,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content is not None
    assert hal0.client.get("/v1/models").status_code == 200
    assert hal0.client.get("/api/health").json()["status"] == "ok"
    assert not _mapped(hal0.proc.pid, "pydantic_core")
    assert hal0.slot("primary")["state"] in ("ready", "serving")
    assert _mapped(hal0.proc.pid, "pydantic_core")
    assert hal0.client.get("/metrics").status_code == 200


@pytest.mark.slow
def test_a_failed_load_gives_every_waiter_the_slot_structured_error(hal0: Hal0,
                                                                   model_files: dict[str, Path]) -> None:
    hal0.add_broken_model("corrupt", model_files["tiny"], model_files["corrupt"])
    hal0.write_slot_config("broken", 'type = "chat"\nmodel = "corrupt"\n')
    hal0.start()

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=hal0.url, timeout=60) as http:
            return await asyncio.gather(*(
                http.post("/v1/chat/completions", json={"model": "broken", "messages": PROMPT}) for _ in range(8)))

    responses = asyncio.run(many())
    errors = [openai_error(r, 503) for r in responses]
    assert len({e["code"] for e in errors}) == 1
    assert len({e["message"] for e in errors}) == 1
    err = errors[0]
    assert err["code"] == "backend_exited"
    assert err["detail"]["slot"] == "broken"
    assert err["detail"]["log_tail"], "the slot's error carries the backend's last log lines"
    assert "exit_code" in err["detail"]

    slot = hal0.slot("broken")
    assert slot["state"] == "error"
    assert slot["error"]["code"] == err["code"]
    assert len(hal0.start_lines("broken")) == 1, "eight waiters, one load"


def test_the_cold_boot_grace_is_configurable_and_the_load_goes_on(hal0: Hal0,
                                                                 model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("primary", 'type = "chat"\nmodel = "tiny"\n')
    hal0.start(env={"HAL0_COLD_BOOT_GRACE_S": "0.001"})
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 2}

    err = openai_error(hal0.client.post("/v1/chat/completions", json=body), 503, "cold_boot_timeout")
    assert "0.001s" in err["message"]
    # The load the request started is not abandoned with it.
    wait_until(lambda: hal0.slot("primary")["state"] == "ready", 30, "primary to finish loading")
    assert hal0.client.post("/v1/chat/completions", json=body).status_code == 200
    assert len(hal0.start_lines("primary")) == 1


def test_streamed_tokens_are_batched_into_fewer_writes_and_none_is_lost(hal0: Hal0,
                                                                        model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("primary", 'type = "chat"\nmodel = "tiny"\n')
    # A window far longer than the tiny model's ~1 ms per token, so batching is certain on any machine; the longest
    # one allowed, so a client descheduled for a while under load still reads the first event before the rest.
    hal0.start(env={"HAL0_STREAM_BATCH_MS": "1000"})
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    whole = hal0.client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    expected = whole.json()["choices"][0]["message"]["content"]

    writes: list[bytes] = []
    with httpx.stream("POST", f"{hal0.url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as resp:
        assert resp.status_code == 200
        writes.extend(resp.iter_raw())
    stream = b"".join(writes).decode()
    events = [line[6:] for line in stream.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                      if json.loads(e)["choices"])
    assert content == expected  # every token, in order, byte for byte
    assert len(events) > 40
    assert len(writes) < len(events) / 4, (len(writes), len(events))
    # The first event leaves at once, alone: batching starts after it (time to first token is untouched).
    assert len(writes) >= 2 and b"[DONE]" not in writes[0]
    # llama-server closes the connection after a stream's last event: the end is relayed then, not once the
    # window is out (which would add up to a window to every stream).
    streamed = decisions(hal0, 2, slot="primary")[0]
    assert streamed["duration_ms"] < 1000, streamed


# -- cold boot ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_32_concurrent_requests_at_a_cold_slot_start_one_backend(tiny: Hal0) -> None:
    async def burst() -> list[Any]:
        oai = async_client(tiny)
        async with oai:
            return await asyncio.gather(*(
                oai.chat.completions.create(model="primary", messages=PROMPT, max_tokens=2)  # type: ignore[arg-type]
                for _ in range(32)))

    results = asyncio.run(burst())
    assert len(results) == 32
    assert all(r.choices[0].message.role == "assistant" for r in results)

    assert len(tiny.start_lines("primary")) == 1
    state = tiny.state("primary")
    assert backend_pids(tiny.home) == [state["pid"]]
    routed = decisions(tiny, 32, slot="primary")
    assert len(routed) == 32
    assert all(d["status"] == 200 and d["outcome"] == "ok" for d in routed)
    waited = [d for d in routed if "cold-load" in d["reason"]]
    assert waited, "the burst met a cold slot"
    assert all(d["wait_ms"] > 0 for d in waited)
    # Released together, the burst must not queue behind the backend's idle keep-alive threads (5 s steps).
    assert max(d["duration_ms"] - d["wait_ms"] for d in routed) < 4000


@pytest.mark.slow
def test_a_slow_loading_model_is_waited_for_instead_of_failing(big: Hal0) -> None:
    big.client.post("/api/slots/big/unload").raise_for_status()
    assert big.slot("big")["state"] == "offline"
    first_seq = big.slot("big")["seq"]
    first_time = time.time()

    async def cold_requests() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=big.url, timeout=60) as http:
            body = {"model": "big", "messages": PROMPT, "max_tokens": 1}
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            # More requests arrive while the backend is already up but still warming.
            while (await http.get("/api/slots/big")).json()["state"] != "warming":
                assert not first.done(), first.result().text
                await asyncio.sleep(0.02)
            later = [asyncio.ensure_future(http.post("/v1/chat/completions", json=body)) for _ in range(3)]
            return [await first, *await asyncio.gather(*later)]

    started = time.monotonic()
    responses = asyncio.run(cold_requests())
    elapsed = time.monotonic() - started
    for resp in responses:
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["role"] == "assistant"
    assert elapsed > 1.0, "the large model takes seconds to load; otherwise this test proves nothing"

    def since_unload() -> list[dict[str, Any]] | None:
        records = [d for d in decisions(big, slot="big") if d["time"] > first_time]
        return records if len(records) >= 4 else None

    cold = wait_until(since_unload, 10, "the four decision records")
    assert len(cold) == 4
    assert all("cold-load" in d["reason"] for d in cold), "all four were held through the cold boot"
    assert max(d["wait_ms"] for d in cold) > 1000
    history = [h["to"] for h in big.slot("big")["history"] if h["seq"] > first_seq]
    assert is_subsequence(["starting", "warming", "ready"], history), history


# -- coalescing ---------------------------------------------------------------------------------------------
async def identical_posts(hal0: Hal0, path: str, body: dict[str, Any], n: int,
                          headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=hal0.url, timeout=60) as http:
        return await asyncio.gather(*(http.post(path, json=body, headers=headers) for _ in range(n)))


def test_identical_concurrent_embeddings_share_one_upstream_call(tiny: Hal0) -> None:
    # Sent at the cold slot: all sixteen are in flight together while it loads.
    responses = asyncio.run(identical_posts(tiny, "/v1/embeddings", {"model": "embed", "input": "same"}, 16))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.content for r in responses}) == 1, "every waiter gets the same bytes"
    assert len(responses[0].json()["data"][0]["embedding"]) == 64
    assert len({r.headers["x-request-id"] for r in responses}) == 16

    routed = decisions(tiny, 16, endpoint="/v1/embeddings")
    assert len(routed) == 16
    assert sum("coalesced" in d["reason"] for d in routed) == 15
    assert all(d["status"] == 200 and d["outcome"] == "ok" for d in routed)


def test_sampled_chat_is_coalesced_only_when_marked_as_a_prefetch(tiny: Hal0) -> None:
    body = {"model": "primary", "messages": PROMPT, "max_tokens": 8}
    unmarked = asyncio.run(identical_posts(tiny, "/v1/chat/completions", body, 6))
    assert all(r.status_code == 200 for r in unmarked)
    assert len({r.json()["id"] for r in unmarked}) == 6, "six sampled requests, six generations"
    assert not any("coalesced" in d["reason"] for d in decisions(tiny, 6))

    tiny.client.post("/api/slots/primary/unload").raise_for_status()  # cold again: all six in flight together
    marked = asyncio.run(identical_posts(tiny, "/v1/chat/completions", body, 6, {"X-Hal0-Prefetch": "1"}))
    assert all(r.status_code == 200 for r in marked)
    assert len({r.content for r in marked}) == 1
    assert sum("coalesced" in d["reason"] for d in decisions(tiny, 12)) == 5


# -- lifecycle around requests ------------------------------------------------------------------------------
@pytest.mark.slow
def test_idle_timeout_then_ttl_unload_are_seen_on_the_event_stream(hal0: Hal0,
                                                                   model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("brief", 'type = "chat"\nmodel = "tiny"\nidle_timeout_s = 0.5\nttl_s = 0.5\n')
    hal0.start()
    with event_stream(hal0, "slot") as events:
        chat = client(hal0).chat.completions.create(model="brief", messages=PROMPT,  # type: ignore[arg-type]
                                                    max_tokens=2)
        assert chat.choices[0].message.role == "assistant"
        done = time.monotonic()
        seen = read_until(events, lambda e: e.get("slot") == "brief" and e.get("to") == "offline", timeout=10)
    offline_after = time.monotonic() - done
    states = [e["to"] for e in seen if e.get("slot") == "brief" and "to" in e]
    assert is_subsequence(["starting", "warming", "ready", "serving", "ready", "idle", "unloading", "offline"],
                          states), states
    idle = next(e for e in seen if e.get("to") == "idle")
    assert "0.5s" in idle["reason"]
    assert "ttl" in seen[-1]["reason"]
    assert offline_after >= 1.0, "idle after 0.5 s, unloaded 0.5 s later"
    assert backend_pids(hal0.home) == []


def test_every_routing_choice_is_a_decision_record(tiny: Hal0) -> None:
    with event_stream(tiny, "decision") as events:
        ok = tiny.client.post("/v1/embeddings", json={"model": "tiny-embed", "input": "x"},
                              headers={"X-Request-Id": "dec-ok"})
        assert ok.status_code == 200
        openai_error(tiny.client.post("/v1/embeddings", json={"model": "nope", "input": "x"},
                                      headers={"X-Request-Id": "dec-404"}), 404)
        live = read_until(events, lambda e: e.get("request_id") == "dec-404")
    live_ids = [e["request_id"] for e in live]
    assert live_ids.index("dec-ok") < live_ids.index("dec-404")
    assert all(e["sse_event"] == "decision" for e in live)

    fields = {"time", "request_id", "endpoint", "model", "candidates", "slot", "reason", "wait_ms", "status",
              "duration_ms", "outcome"}
    lines = [json.loads(line) for line in (tiny.home / "logs" / "decisions.jsonl").read_text().splitlines()]
    by_id = {rec["request_id"]: rec for rec in lines}
    good, missing = by_id["dec-ok"], by_id["dec-404"]
    assert fields <= set(good) and fields <= set(missing)
    assert good["endpoint"] == "/v1/embeddings" and good["model"] == "tiny-embed"
    assert good["candidates"] == [{"slot": "embed", "ref": "tiny-embed", "state": "offline", "type": "embed",
                                   "matched_by": "ref", "fits": True}]
    assert (good["slot"], good["reason"], good["status"], good["outcome"]) == (
        "embed", "ref,cold-load", 200, "ok")
    assert 0 < good["wait_ms"] <= good["duration_ms"]
    assert time.time() - 60 < good["time"] <= time.time()
    assert (missing["slot"], missing["status"], missing["outcome"]) == (None, 404, "rejected:model_not_found")
    assert missing["candidates"] == []

    assert [d["request_id"] for d in decisions(tiny, slot="embed")] == ["dec-ok"]
    assert [d["request_id"] for d in decisions(tiny, outcome="rejected:model_not_found")] == ["dec-404"]
    assert [d["request_id"] for d in decisions(tiny, limit=1)] == ["dec-404"]


# -- streaming: cancellation and failure --------------------------------------------------------------------
@pytest.mark.slow
def test_a_client_disconnect_cancels_the_upstream_generation(big: Hal0) -> None:
    ensure_ready(big, "big")
    port = big.state("big")["port"]
    oai = client(big)
    stream = oai.chat.completions.create(model="big", messages=PROMPT, max_tokens=1500,  # type: ignore[arg-type]
                                         stream=True, extra_headers={"X-Request-Id": "cancel-me"})
    got = 0
    for _chunk in stream:
        got += 1
        if got == 3:
            break
    # Mid-generation: hal0 counts the request, and llama-server is working on it (about 40 s at full length).
    view = big.slot("big")
    assert (view["state"], view["in_flight"]) == ("serving", 1)
    busy = [s for s in backend_slots(port) if s["is_processing"]]
    assert len(busy) == 1
    task = busy[0]["id_task"]

    stream.close()
    closed = time.monotonic()
    wait_until(lambda: not any(s["is_processing"] for s in backend_slots(port)), 10,
               "llama-server to stop generating")
    assert time.monotonic() - closed < 10
    log = (big.home / "logs" / "slots" / "big.log").read_text()
    assert f"cancel task, id_task = {task}" in log, "llama-server saw the cancel"
    released = [line for line in log.splitlines() if f"task {task} | stop processing" in line]
    assert released and int(released[-1].split("n_tokens = ")[1].split(",")[0]) < 1500

    wait_until(lambda: big.slot("big")["in_flight"] == 0, 5, "the request to be released")
    assert big.slot("big")["state"] == "ready"
    assert decision_for(big, "cancel-me")["outcome"] == "client_disconnected"


@pytest.mark.slow
def test_a_backend_killed_mid_stream_ends_the_stream_with_an_error_event(big: Hal0) -> None:
    ensure_ready(big, "big")
    pid = big.state("big")["pid"]
    oai = client(big, timeout=30)  # a hang would surface as a timeout, not as the error event below
    stream = oai.chat.completions.create(model="big", messages=PROMPT, max_tokens=1500,  # type: ignore[arg-type]
                                         stream=True, extra_headers={"X-Request-Id": "kill-me"})
    got = 0
    with pytest.raises(openai.APIError) as failure:
        for _chunk in stream:
            got += 1
            if got == 3:
                os.kill(pid, signal.SIGKILL)
    assert not isinstance(failure.value, openai.APITimeoutError | openai.APIConnectionError), failure.value
    body = failure.value.body
    assert isinstance(body, dict)
    assert body["code"] == "backend_failed" and body["type"] == "server_error"
    assert "mid-stream" in body["message"]

    wait_until(lambda: big.slot("big")["state"] == "error", 5, "the slot to go to error")
    error = big.slot("big")["error"]
    assert error["code"] == "backend_exited"
    assert "SIGKILL" in error["message"] or "-9" in error["message"] or "signal" in error["message"]
    assert decision_for(big, "kill-me")["outcome"] == "backend_failed"


# -- a client that goes away, seen with and without hal0's server -------------------------------------------
@pytest.mark.parametrize("extension", [True, False], ids=["hal0-server", "other-server"])
async def test_a_client_gone_mid_block_ends_it_quietly_as_client_disconnected(extension: bool) -> None:
    """Under hal0's server its disconnect extension cancels the block (no task waits on `receive`); under another
    ASGI server a watcher task waits for `http.disconnect`. Either way the block ends as `client_disconnected`, the
    handler is not left cancelled, and nothing is left watching."""
    from hal0.dispatch.decisions import Decision
    from hal0.dispatch.proxy import _ClientCanCancel
    from hal0.server.connection import DISCONNECT

    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    watchers: list[Callable[[], None]] = []

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    scope: dict[str, Any] = {}
    if extension:
        scope["extensions"] = {DISCONNECT: {"watch": watchers.append, "unwatch": watchers.remove}}
    decision = Decision(request_id="r", endpoint="/v1/chat/completions", model="m")
    before = len(asyncio.all_tasks())

    async def handler() -> str:
        async with _ClientCanCancel(scope, receive, decision):
            if extension:
                assert len(watchers) == 1
                loop.call_later(0.05, watchers[0])
            else:
                loop.call_later(0.05, gone.set)
            await asyncio.sleep(30)
        await asyncio.sleep(0)  # the handler goes on: the cancellation was taken back
        return "went on"

    task = asyncio.create_task(handler())
    async with asyncio.timeout(5):
        assert await task == "went on"
    assert task.cancelling() == 0
    assert decision.outcome == "client_disconnected"
    assert watchers == [] and len(asyncio.all_tasks()) == before
