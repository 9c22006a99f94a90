"""A real Prometheus scrapes a real hal0 (real llama-server behind it) every second; its own query API then has to
agree with the traffic the test sent: request counts by status, token sums the client saw, loads, histograms.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Hal0, free_port, wait_until

PROMETHEUS = os.environ.get("HAL0_PROMETHEUS", "/usr/bin/prometheus")

pytestmark = pytest.mark.slow


class Prometheus:
    def __init__(self, binary: str, home: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: hal0\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = home / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=home)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = self.client.get("/api/v1/query", params={"query": promql})
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def values(self, promql: str, by: str | None = None) -> dict[str, float]:
        """An instant vector as {label value (or ""): number}."""
        return {(r["metric"].get(by, "") if by else ""): float(r["value"][1]) for r in self.query(promql)}

    def scalar(self, promql: str) -> float | None:
        found = self.values(promql)
        return found.get("")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.client.close()


@pytest.fixture
def prometheus_binary() -> str:
    found = PROMETHEUS if os.access(PROMETHEUS, os.X_OK) else shutil.which("prometheus")
    if not found:
        reason = (f"no prometheus binary at {PROMETHEUS} or on PATH (apt-get install prometheus; ./run.sh test does, "
                  "or set HAL0_PROMETHEUS)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture
def scraped(hal0: Hal0, prometheus_binary: str, model_files: dict[str, Path],
            tmp_path: Path) -> Iterator[tuple[Hal0, Prometheus]]:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    prom = Prometheus(prometheus_binary, tmp_path / "prometheus", f"127.0.0.1:{hal0.port}")
    try:
        wait_until(prom.ready, 60, "prometheus to be ready")
        wait_until(lambda: prom.scalar('up{job="hal0"}') == 1, 30, "prometheus to scrape hal0")
        yield hal0, prom
    finally:
        prom.stop()


def chat(hal0: Hal0, text: str, **extra: Any) -> dict[str, Any]:
    resp = hal0.client.post("/v1/chat/completions", json={
        "model": "primary", "max_tokens": 8, "messages": [{"role": "user", "content": text}], **extra})
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def stream(hal0: Hal0, text: str, **extra: Any) -> list[dict[str, Any]]:
    events = []
    with hal0.client.stream("POST", "/v1/chat/completions", json={
            "model": "primary", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": text}], **extra}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs: linear within the bucket found."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_bound
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    raise AssertionError("no bucket holds the rank")


def test_prometheus_sees_exactly_the_traffic_that_was_sent(scraped: tuple[Hal0, Prometheus]) -> None:
    hal0, prom = scraped
    prompt = completion = 0
    # The slot is cold: the first request loads it.
    for i in range(4):
        usage = chat(hal0, f"hello {i}")["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    for i in range(2):  # the client asks for usage itself; hal0 never adds stream_options
        events = stream(hal0, f"stream {i}", stream_options={"include_usage": True})
        usage = events[-1]["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    for i in range(2):  # no usage in the stream: llama-server's last chunk has its timings
        events = stream(hal0, f"bare {i}")
        assert not [e for e in events if e.get("usage")], "hal0 must not ask the backend for usage"
        timings = [e["timings"] for e in events if "timings" in e][-1]
        prompt += timings["prompt_n"] + timings.get("cache_n", 0)
        completion += timings["predicted_n"]
    for _ in range(3):
        assert hal0.client.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 404
    bad = hal0.client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    sent_ok = 4 + 2 + 2

    # Everything above is done; wait until Prometheus has scraped it all.
    wait_until(lambda: prom.scalar("sum(hal0_requests_total)") == sent_ok + 4, 30, "the last scrape")
    assert prom.values('sum by (status) (hal0_requests_total{slot="primary"})', "status") == {"200": sent_ok}
    assert prom.values('sum by (status) (hal0_requests_total{slot=""})', "status") == {"404": 3, "400": 1}
    assert prom.scalar('sum(hal0_completion_tokens_total{slot="primary"})') == completion
    assert prom.scalar('sum(hal0_prompt_tokens_total{slot="primary"})') == prompt
    assert prom.scalar('sum(hal0_time_to_first_token_seconds_count{slot="primary"})') == 2 + 2
    assert prom.scalar('sum(hal0_request_duration_seconds_count{slot="primary"})') == sent_ok
    assert prom.values('hal0_loads_total{slot="primary"}', "outcome") == {"ok": 1}
    assert prom.scalar('hal0_load_duration_seconds_count{slot="primary"}') == 1
    assert prom.values('hal0_decisions_total', "outcome") == {
        "ok": sent_ok, "rejected:model_not_found": 3, "rejected:invalid_json": 1}
    wait_until(lambda: prom.scalar('hal0_slot_state{slot="primary",state="ready"}') == 1, 30, "ready in prometheus")
    assert prom.scalar('sum(hal0_slot_state{slot="primary"})') == 1
    assert prom.scalar('hal0_requests_in_flight{slot="primary"}') == 0
    assert prom.scalar('hal0_requests_held{slot="primary"}') == 0
    estimate = hal0.slot("primary")["memory"]["estimate"]["total_bytes"]
    assert prom.scalar('hal0_slot_memory_bytes{slot="primary",source="estimate"}') == estimate
    # Memory is sampled once a second: the first sample after the load may come after the scrape above.
    wait_until(lambda: (prom.scalar('hal0_slot_memory_bytes{slot="primary",source="measured"}') or 0) > 0, 30,
               "the measured memory in prometheus")
    assert prom.values("hal0_write_failures_total", "channel") == {"state": 0, "decisions": 0}

    # The quantile Prometheus computes is the one hal0's own buckets give.
    families = {f.name: f for f in text_string_to_metric_families(hal0.client.get("/metrics").text)}
    buckets = [(float(s.labels["le"]), s.value) for s in families["hal0_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["slot"] == "primary"]
    got = prom.scalar('histogram_quantile(0.5, sum by (le) (hal0_request_duration_seconds_bucket{slot="primary"}))')
    assert got == pytest.approx(bucket_quantile(0.5, buckets))

    # A known burst on top: the counter moves by exactly that much, and increase() (which extrapolates to the
    # ends of its range, never less) sees at least that much.
    before = prom.scalar('sum(hal0_requests_total{slot="primary"})') or 0
    for i in range(5):
        chat(hal0, f"burst {i}")
    wait_until(lambda: prom.scalar('sum(hal0_requests_total{slot="primary"})') == before + 5, 30,
               "the burst in prometheus")
    assert (prom.scalar('sum(increase(hal0_requests_total{slot="primary",status="200"}[5m]))') or 0) >= 5
