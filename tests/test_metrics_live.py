"""Metrics against a real llama-server: every answer shape's token counts reach the decision record as the client
saw them (without hal0 changing the request), and a request held by a cold load shows in the gauges.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Hal0, wait_until


def gauge(hal0: Hal0, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(hal0.client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def events(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data: {")]


def newest_decision(hal0: Hal0, endpoint: str, seen: set[str]) -> dict[str, Any]:
    """The first record for `endpoint` not seen before (a record is written just after the answer's last byte)."""
    def fresh() -> dict[str, Any] | None:
        for d in hal0.client.get("/api/decisions", params={"endpoint": endpoint}).json()["data"]:
            if d["request_id"] not in seen:
                return d
        return None

    found: dict[str, Any] = wait_until(fresh, 10, f"the decision record of {endpoint}")
    seen.add(found["request_id"])
    return found


def test_every_answer_shape_reports_the_tokens_the_client_saw(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").status_code == 200
    seen: set[str] = set()
    msgs = [{"role": "user", "content": "count to three"}]
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("/v1/chat/completions", {"messages": msgs}, False),
        ("/v1/chat/completions", {"messages": msgs}, True),
        ("/v1/completions", {"prompt": "count to three"}, False),
        ("/v1/completions", {"prompt": "count to three"}, True),
        ("/v1/messages", {"messages": msgs}, False),
        ("/v1/messages", {"messages": msgs}, True),
        ("/v1/responses", {"input": "count to three", "max_output_tokens": 6}, False),
    ]
    for endpoint, body, streamed in cases:
        payload = {"model": "primary", "max_tokens": 6, **body, **({"stream": True} if streamed else {})}
        if endpoint == "/v1/responses":
            payload.pop("max_tokens")
        if streamed:
            with hal0.client.stream("POST", endpoint, json=payload) as resp:
                assert resp.status_code == 200, endpoint
                got = events(resp)
            if endpoint == "/v1/messages":
                start = next(e for e in got if e.get("type") == "message_start")["message"]["usage"]
                prompt = start["input_tokens"] + start.get("cache_read_input_tokens", 0)
                completion = [e for e in got if e.get("type") == "message_delta"][-1]["usage"]["output_tokens"]
            elif endpoint == "/v1/chat/completions":
                # The client did not ask for usage, and hal0 did not ask for it on its behalf: timings it is.
                assert not [e for e in got if e.get("usage")], endpoint
                timings = [e["timings"] for e in got if "timings" in e][-1]
                prompt, completion = timings["prompt_n"] + timings["cache_n"], timings["predicted_n"]
            else:  # llama-server ends a /v1/completions stream with its usage unasked
                usage = [e["usage"] for e in got if e.get("usage")][-1]
                prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        else:
            resp = hal0.client.post(endpoint, json=payload)
            assert resp.status_code == 200, (endpoint, resp.text)
            usage = resp.json()["usage"]
            prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) + usage.get(
                "cache_read_input_tokens", 0)
            completion = usage.get("completion_tokens", usage.get("output_tokens"))
        record = newest_decision(hal0, endpoint, seen)
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion), (endpoint, streamed)
        assert prompt > 0 and completion > 0
        assert (record["ttft_ms"] is not None) == streamed, (endpoint, record)

    prompt_total = gauge(hal0, "hal0_prompt_tokens_total", slot="primary")
    records = [d for d in hal0.client.get("/api/decisions").json()["data"] if d["slot"] == "primary"]
    assert prompt_total == sum(d["prompt_tokens"] for d in records)


def test_a_request_held_by_a_cold_load_shows_as_held_until_the_load_ends(hal0: Hal0, large_model: Path) -> None:
    hal0.models.import_file("large", large_model, link=True, slot_type="chat")
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "large"}).status_code == 200
    answers: list[int] = []

    def ask() -> None:
        with httpx.Client(base_url=hal0.url, timeout=120) as client:
            answers.append(client.post("/v1/chat/completions", json={
                "model": "primary", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).status_code)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        wait_until(lambda: gauge(hal0, "hal0_requests_held", slot="primary") == 1, 30, "the request held")
        assert gauge(hal0, "hal0_slot_state", slot="primary", state="ready") == 0
    finally:
        asker.join(120)
    assert answers == [200]
    wait_until(lambda: gauge(hal0, "hal0_requests_held", slot="primary") == 0, 10, "the hold released")
    assert gauge(hal0, "hal0_loads_total", slot="primary", outcome="ok") == 1
    assert gauge(hal0, "hal0_load_duration_seconds_count", slot="primary") == 1
    waited = [d for d in hal0.client.get("/api/decisions").json()["data"] if d["slot"] == "primary"]
    assert waited and waited[0]["wait_ms"] > 0
