"""Metrics without a backend: the counters a decision record, a slot transition and a pull move, the token
counts read from answers, the per-second ring behind /api/stats, and the /metrics and /api/stats routes of
a real API process (key rule, error shapes).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hal0.dispatch.decisions import Decision
from hal0.dispatch.usage import TAIL_CHUNKS, AnswerMeter, Usage, usage_from_body, usage_from_events
from hal0.events import EventBus
from hal0.metrics import Metrics
from hal0.slots.state import SlotState
from hal0.stats import WINDOW_S, SlotSample, StatsRing
from tests.conftest import Hal0


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one exposition, by name and sorted labels: what a scraper reads."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def decision(**fields: Any) -> dict[str, Any]:
    d = Decision(request_id="r", endpoint=fields.pop("endpoint", "/v1/chat/completions"), model="m")
    for key, val in fields.items():
        setattr(d, key, val)
    return d.to_dict()


@pytest.fixture
def wired() -> tuple[EventBus, Metrics, StatsRing]:
    bus, stats = EventBus(), StatsRing()
    slots = [SlotSample("primary", "ready", 2, 1000, 1500), SlotSample("embed", "offline")]
    metrics = Metrics([s.value for s in SlotState], lambda: slots, lambda: {"state": 3})
    bus.tap(metrics.observe)
    bus.tap(stats.observe)
    metrics.hold("embed")
    return bus, metrics, stats


# -- counters from the bus ---------------------------------------------------------------------------------
def test_a_decision_record_counts_the_request_its_duration_ttft_and_tokens(wired: Any) -> None:
    bus, metrics, _ = wired
    bus.publish("decision", decision(slot="primary", status=200, outcome="ok", duration_ms=120.0, ttft_ms=30.0,
                                     prompt_tokens=7, completion_tokens=16))
    bus.publish("decision", decision(slot="primary", status=200, outcome="ok", duration_ms=80.0,
                                     prompt_tokens=5, completion_tokens=4))
    bus.publish("decision", decision(slot=None, status=404, outcome="rejected:model_not_found"))
    ep = "/v1/chat/completions"
    assert value(metrics, "hal0_requests_total", slot="primary", endpoint=ep, status="200") == 2
    assert value(metrics, "hal0_requests_total", slot="", endpoint=ep, status="404") == 1
    assert value(metrics, "hal0_request_duration_seconds_count", slot="primary", endpoint=ep) == 2
    assert value(metrics, "hal0_request_duration_seconds_sum", slot="primary", endpoint=ep) == pytest.approx(0.2)
    assert value(metrics, "hal0_request_duration_seconds_bucket", slot="primary", endpoint=ep, le="0.1") == 1
    # Only the streamed one had a first token.
    assert value(metrics, "hal0_time_to_first_token_seconds_count", slot="primary", endpoint=ep) == 1
    assert value(metrics, "hal0_time_to_first_token_seconds_bucket", slot="primary", endpoint=ep,
                 le="0.025") == 0
    assert value(metrics, "hal0_time_to_first_token_seconds_bucket", slot="primary", endpoint=ep,
                 le="0.05") == 1
    assert value(metrics, "hal0_prompt_tokens_total", slot="primary") == 12
    assert value(metrics, "hal0_completion_tokens_total", slot="primary") == 20
    assert value(metrics, "hal0_decisions_total", outcome="ok") == 2
    assert value(metrics, "hal0_decisions_total", outcome="rejected:model_not_found") == 1


def test_an_evicted_record_counts_an_eviction_by_its_reason_and_no_request(wired: Any) -> None:
    bus, metrics, stats = wired
    record = decision(endpoint="", slot="embed", outcome="evicted", reason="insufficient_memory for primary")
    bus.publish("decision", record)
    bus.publish("decision", record)
    assert value(metrics, "hal0_evictions_total", slot="embed", reason="insufficient_memory for primary") == 2
    assert value(metrics, "hal0_decisions_total", outcome="evicted") == 2
    assert not [k for k in samples(metrics) if k[0] == "hal0_requests_total"]
    assert sum(stats.view(int(record["time"]), 5, ["embed"])["slots"]["embed"]["requests"]) == 0


def test_transitions_count_loads_by_outcome_and_time_the_successful_ones(wired: Any) -> None:
    bus, metrics, _ = wired

    def move(slot: str, src: str, dst: str, at: float) -> None:
        bus.publish("slot", {"slot": slot, "from": src, "to": dst, "seq": 1, "time": at, "reason": ""})

    move("primary", "offline", "starting", 100.0)
    move("primary", "starting", "warming", 100.2)
    move("primary", "warming", "ready", 100.7)
    move("primary", "ready", "serving", 101.0)  # not a load
    move("embed", "error", "pulling", 200.0)
    move("embed", "pulling", "starting", 203.0)
    move("embed", "starting", "error", 203.5)
    move("primary", "offline", "starting", 300.0)
    move("primary", "starting", "unloading", 300.1)
    # An adoption re-publishes the same state: nothing happened.
    bus.publish("slot", {"slot": "primary", "from": "ready", "to": "ready", "time": 301.0, "reason": "adopted"})
    assert value(metrics, "hal0_loads_total", slot="primary", outcome="ok") == 1
    assert value(metrics, "hal0_loads_total", slot="primary", outcome="cancelled") == 1
    assert value(metrics, "hal0_loads_total", slot="embed", outcome="error") == 1
    assert value(metrics, "hal0_load_duration_seconds_count", slot="primary") == 1
    assert value(metrics, "hal0_load_duration_seconds_sum", slot="primary") == pytest.approx(0.7)
    assert value(metrics, "hal0_load_duration_seconds_count", slot="embed") is None


def test_pull_bytes_count_what_was_downloaded_not_what_a_resume_already_had(wired: Any) -> None:
    bus, metrics, _ = wired
    for done in (1000, 1500, 4000):  # the first report is the resumed offset
        bus.publish("pull", {"ref": "m", "kind": "progress", "file": "a.gguf", "bytes_done": done})
    for done in (0, 250):
        bus.publish("pull", {"ref": "m", "kind": "progress", "file": "b.gguf", "bytes_done": done})
    bus.publish("pull", {"ref": "m", "kind": "done", "bytes_done": 4250})
    assert value(metrics, "hal0_pull_bytes_total") == 3000 + 250


def test_live_gauges_are_read_at_scrape_time(wired: Any) -> None:
    _, metrics, _ = wired
    assert value(metrics, "hal0_slot_state", slot="primary", state="ready") == 1
    assert value(metrics, "hal0_slot_state", slot="primary", state="serving") == 0
    assert sum(v for (n, labels), v in samples(metrics).items()
               if n == "hal0_slot_state" and ("slot", "embed") in labels) == 1
    assert value(metrics, "hal0_requests_in_flight", slot="primary") == 2
    assert value(metrics, "hal0_requests_held", slot="embed") == 1
    assert value(metrics, "hal0_slot_memory_bytes", slot="primary", source="estimate") == 1000
    assert value(metrics, "hal0_slot_memory_bytes", slot="primary", source="measured") == 1500
    assert value(metrics, "hal0_slot_memory_bytes", slot="embed", source="measured") is None
    assert value(metrics, "hal0_write_failures_total", channel="state") == 3
    assert value(metrics, "hal0_write_failures_total", channel="decisions") == 0


def test_a_hold_is_released_once_however_often_it_is_released() -> None:
    metrics = Metrics()
    hold = metrics.hold("primary")
    with metrics.hold("primary"):
        assert metrics.held("primary") == 2
    hold.release()
    hold.release()
    assert metrics.held("primary") == 0


def test_two_apps_in_one_process_keep_their_own_registries() -> None:
    a, b = Metrics(), Metrics()
    a.pull_bytes.labels().inc(5)
    assert value(a, "hal0_pull_bytes_total") == 5
    assert value(b, "hal0_pull_bytes_total") == 0


# -- token counts from answers ---------------------------------------------------------------------------------
def test_usage_is_read_from_a_json_answer_without_parsing_the_rest() -> None:
    body = json.dumps({"choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 999}'}}],
                       "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
                       "timings": {"prompt_n": 1, "cache_n": 10, "predicted_n": 5}}).encode()
    assert usage_from_body(body) == Usage(11, 5)
    anthropic = json.dumps({"type": "message", "usage": {"input_tokens": 9, "output_tokens": 3}}).encode()
    assert usage_from_body(anthropic) == Usage(9, 3)
    # Anthropic counts cached prompt tokens apart; the prompt is all of them.
    cached = json.dumps({"usage": {"cache_read_input_tokens": 19, "input_tokens": 1, "output_tokens": 3}}).encode()
    assert usage_from_body(cached) == Usage(20, 3)
    assert usage_from_body(b'{"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 4}}') == Usage(4, 0)
    assert usage_from_body(b'{"choices": []}') is None
    assert usage_from_body(b'{"usage": {"prompt_tokens": ') is None


def test_a_stream_without_usage_is_counted_from_llama_servers_timings() -> None:
    events = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"length"}],'
              b'"timings":{"cache_n":3,"prompt_n":6,"predicted_n":4}}\n\ndata: [DONE]\n\n')
    assert usage_from_events(events) == Usage(9, 4)
    with_usage = events.replace(b'"timings"', b'"usage":{"prompt_tokens":9,"completion_tokens":4},"timings"')
    assert usage_from_events(with_usage) == Usage(9, 4)


def test_an_anthropic_stream_takes_input_tokens_from_its_first_event_and_output_from_its_last() -> None:
    meter = AnswerMeter("text/event-stream")
    meter.feed(b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
               b'{"input_tokens":12,"output_tokens":1}}}\n\n')
    for _ in range(TAIL_CHUNKS * 2):
        meter.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"x"}}\n\n')
    meter.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":16}}\n\n')
    assert meter.first_at is not None
    assert meter.usage() == Usage(12, 16)


def test_a_meter_reads_a_json_answer_cut_into_chunks_and_ignores_other_bodies() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    meter = AnswerMeter("application/json; charset=utf-8")
    for i in range(0, len(body), 7):
        meter.feed(body[i:i + 7])
    assert meter.usage() == Usage(3, 2)
    audio = AnswerMeter("audio/mpeg")
    audio.feed(b'"usage": {"prompt_tokens": 3}')
    assert audio.usage() is None


# -- the per-second ring -----------------------------------------------------------------------------------------
def test_the_ring_aggregates_per_second_and_spreads_tokens_over_the_generation() -> None:
    ring = StatsRing()
    t0 = 1_000_000
    ring.record_decision(decision(slot="primary", time=t0 + 0.5, duration_ms=2000.0, ttft_ms=500.0, status=200,
                                  outcome="ok", prompt_tokens=8, completion_tokens=30))
    ring.record_decision(decision(slot="primary", time=t0 + 2.1, duration_ms=100.0, ttft_ms=20.0, status=200,
                                  outcome="ok", wait_ms=10.0))
    ring.record_decision(decision(slot="primary", time=t0 + 2.3, duration_ms=10.0, status=502,
                                  outcome="backend_failed"))
    view = ring.view(t0 + 3, 4)
    assert view["t"] == [t0, t0 + 1, t0 + 2, t0 + 3]
    s = view["slots"]["primary"]
    assert s["requests"] == [0, 0, 3, 0]
    assert s["errors"] == [0, 0, 1, 0]
    assert s["waited"] == [0, 0, 1, 0]
    # Generated from t0+1.0 to t0+2.5: 30 tokens over 1.5 s.
    assert s["completion_tokens"] == [0.0, 20.0, 10.0, 0.0]
    assert s["prompt_tokens"] == [0, 8, 0, 0]
    assert s["ttft_p50_ms"] == [None, None, 20.0, None]
    assert s["ttft_p95_ms"] == [None, None, 500.0, None]


def test_the_timeline_shows_the_state_that_explains_each_second() -> None:
    bus, ring = EventBus(), StatsRing()
    bus.tap(ring.observe)
    t0 = 2_000_000
    ring.sample(t0, [SlotSample("primary", "offline")])
    for src, dst, at in (("offline", "starting", t0 + 1.1), ("starting", "warming", t0 + 1.2),
                         ("warming", "ready", t0 + 1.9), ("ready", "serving", t0 + 2.1),
                         ("serving", "ready", t0 + 2.2)):
        bus.publish("slot", {"slot": "primary", "from": src, "to": dst, "time": at})
    ring.sample(t0 + 3, [SlotSample("primary", "ready", 0, 10, 20)])
    s = ring.view(t0 + 3, 4)["slots"]["primary"]
    assert s["state"] == ["offline", "starting", "serving", "ready"]
    assert s["memory_bytes"] == [None, None, None, 20]
    assert s["memory_estimate_bytes"] == [None, None, None, 10]
    assert ring.memory("primary") == (10, 20)
    bus.publish("slot", {"slot": "primary", "event": "deleted"})
    assert ring.view(t0 + 3, 4, ["primary"])["slots"]["primary"]["state"] == [None] * 4


def test_the_ring_forgets_what_is_older_than_its_window() -> None:
    ring = StatsRing()
    t0 = 3_000_000
    ring.record_decision(decision(slot="primary", time=t0 + 0.1, status=200, outcome="ok"))
    assert ring.view(t0, 1)["slots"]["primary"]["requests"] == [1]
    ring.record_decision(decision(slot="primary", time=t0 + WINDOW_S + 0.1, status=200, outcome="ok"))
    assert ring.view(t0, 1)["slots"]["primary"]["requests"] == [0]
    late = decision(slot="primary", time=t0 + 0.2, status=200, outcome="ok")
    ring.record_decision(late)  # a record for a second the ring no longer holds is dropped, not misfiled
    assert sum(ring.view(t0 + WINDOW_S, WINDOW_S)["slots"]["primary"]["requests"]) == 1
    assert len(ring.view(t0 + WINDOW_S, 10_000)["t"]) == WINDOW_S
    # An answer that took longer than the window: its tokens land in the seconds the ring holds, and nothing
    # it touches wipes the current second's count.
    now = t0 + WINDOW_S
    ring.record_decision(decision(slot="primary", time=now - 1000 + 0.5, duration_ms=1_000_000.0, ttft_ms=0.0,
                                  status=200, outcome="ok", prompt_tokens=7, completion_tokens=2000))
    s = ring.view(now, WINDOW_S)["slots"]["primary"]
    assert s["requests"][-1] == 2
    assert sum(s["prompt_tokens"]) == 0
    assert sum(s["completion_tokens"]) == pytest.approx(2000 * (WINDOW_S - 0.5) / 1000, abs=0.1)


# -- the routes of a real API --------------------------------------------------------------------------------------
def test_metrics_and_stats_are_served_with_the_api_key_rule_and_openai_shaped_errors(hal0_factory: Any) -> None:
    hal0: Hal0 = hal0_factory(None)
    hal0.start(env={"HAL0_API_KEYS": "sekrit"})
    for path in ("/metrics", "/api/stats"):
        resp = hal0.client.get(path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sekrit"}
    assert hal0.client.post("/v1/chat/completions", headers=auth, json={"model": "nope"}).status_code == 404
    resp = hal0.client.get("/metrics", headers=auth)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["hal0_requests"].samples}
    assert got[("hal0_requests_total", (("endpoint", "/v1/chat/completions"), ("slot", ""),
                                        ("status", "404")))] == 1
    states = [s for s in families["hal0_slot_state"].samples if s.labels["slot"] == "primary"]
    assert {s.labels["state"] for s in states} == {s.value for s in SlotState}
    assert [s.labels["state"] for s in states if s.value == 1] == ["offline"]

    stats = hal0.client.get("/api/stats", headers=auth, params={"seconds": 30}).json()
    assert len(stats["t"]) == 30 and stats["end"] - stats["start"] == 29
    assert list(stats["slots"]) == ["primary", "embed", "stt", "tts"]
    assert all(len(series) == 30 for series in stats["slots"]["primary"].values())
    one = hal0.client.get("/api/stats", headers=auth, params={"slot": "embed", "seconds": 5}).json()
    assert list(one["slots"]) == ["embed"]
    for params, code in (({"slot": "nope"}, "slot_not_found"), ({"seconds": 0}, "invalid_request"),
                         ({"seconds": "many"}, "invalid_request"), ({"seconds": 901}, "invalid_request")):
        resp = hal0.client.get("/api/stats", headers=auth, params=params)
        assert 400 <= resp.status_code < 500, params
        err = resp.json()["error"]
        assert err["code"] == code and err["message"], (params, err)


def test_the_sampler_records_every_slots_state_each_second(hal0_factory: Any) -> None:
    hal0: Hal0 = hal0_factory(None).start()
    from tests.conftest import wait_until

    def sampled() -> Any:
        data = hal0.client.get("/api/stats", params={"seconds": 3}).json()
        return data if data["slots"]["primary"]["state"][-1] == "offline" else None

    data = wait_until(sampled, 10, "a sample of the slots")
    assert all(s["state"][-1] == "offline" for s in data["slots"].values())
    with httpx.Client(base_url=hal0.url) as client:
        assert client.get("/metrics").status_code == 200  # no keys configured: open like /api
