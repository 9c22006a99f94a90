"""The dashboard's activity charts in headless Chromium against a real API and llama-server: they are drawn (their
canvases hold the series' colours) from exactly the numbers `/api/stats` gives, and the state timeline shows
the cold load the first request waited for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Hal0, wait_until
from tests.test_dashboard import UI_TIMEOUT_MS, browser, dashboard  # noqa: F401 (fixtures)

# Pixels of one colour (within a little antialiasing) in each canvas under `root`.
_COUNT_COLOUR = """([selector, hex]) => {
    const want = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    return [...document.querySelectorAll(selector)].map((canvas) => {
        const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i + 3] > 200 && Math.abs(px[i] - want[0]) + Math.abs(px[i + 1] - want[1])
                + Math.abs(px[i + 2] - want[2]) < 40) n += 1;
        }
        return n;
    });
}"""
# The colour of the timeline at second index i (of n).
_TIMELINE_AT = """([selector, i, n]) => {
    const canvas = document.querySelector(selector);
    const x = Math.floor((i + 0.5) * canvas.width / n);
    const px = canvas.getContext("2d").getImageData(x, Math.floor(canvas.height / 2), 1, 1).data;
    return "#" + [0, 1, 2].map((k) => px[k].toString(16).padStart(2, "0")).join("");
}"""


def css_var(page: Any, name: str) -> str:
    value: str = page.evaluate(f"getComputedStyle(document.documentElement).getPropertyValue('{name}').trim()")
    return value


def traffic(hal0: Hal0) -> int:
    """Three answers and two streams through a cold slot (the first request loads it); the tokens generated."""
    tokens = 0
    for i in range(3):
        resp = hal0.client.post("/v1/chat/completions", json={
            "model": "primary", "max_tokens": 8, "messages": [{"role": "user", "content": f"hi {i}"}]})
        assert resp.status_code == 200
        tokens += resp.json()["usage"]["completion_tokens"]
    for i in range(2):
        with hal0.client.stream("POST", "/v1/chat/completions", json={
                "model": "primary", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"stream {i}"}]}) as resp:
            assert resp.status_code == 200
            last = [line for line in resp.iter_lines() if '"usage"' in line][-1]
        tokens += json.loads(last[len("data: "):])["usage"]["completion_tokens"]
    return tokens


def test_activity_charts_are_drawn_from_the_numbers_api_stats_gives(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:  # noqa: F811
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    tokens = traffic(hal0)

    # The second of the cold load; the page is read once a few seconds have followed it.
    def load_second() -> int | None:
        got = hal0.client.get("/api/stats", params={"slot": "primary", "seconds": 60}).json()
        return next((t for t, state in zip(got["t"], got["slots"]["primary"]["state"], strict=True)
                     if state in ("starting", "warming", "pulling")), None)

    load_at: int = wait_until(load_second, 10, "the load's second to be complete")
    board = dashboard(hal0)
    page = board.open("#/activity")
    page.wait_for_function("(after) => window.hal0Charts?.primary?.end >= after", arg=load_at + 5,
                           timeout=UI_TIMEOUT_MS)
    drawn = page.evaluate("JSON.parse(JSON.stringify(window.hal0Charts.primary))")
    board.shot("activity")
    stats = hal0.client.get("/api/stats", params={"slot": "primary", "end": drawn["end"]}).json()
    s = stats["slots"]["primary"]
    t = stats["t"]
    assert drawn["t"] == t and len(t) == 900
    assert drawn["requests"] == [t, s["requests"], s["waited"]]
    assert drawn["ttft"] == [t, s["ttft_p50_ms"], s["ttft_p95_ms"]]
    assert drawn["tokens"] == [t, s["completion_tokens"]]
    assert drawn["memory"] == [t, s["memory_bytes"], s["memory_estimate_bytes"]]
    assert drawn["state"] == s["state"]
    assert sum(s["requests"]) == 5
    assert sum(s["waited"]) == 1  # the first one, through the cold load
    assert sum(s["completion_tokens"]) == pytest.approx(tokens, abs=0.01)
    assert sum(v is not None for v in s["ttft_p50_ms"]) >= 1  # the streams had a first token
    assert any(v for v in s["memory_bytes"] if v)

    # Drawn, not only given: each chart's canvas holds its series' colour (TTFT: p95 is drawn over p50, and with
    # one stream per second the two are the same).
    for key, colours in (("requests", ["--accent"]), ("tokens", ["--ready"]), ("ttft", ["--serving", "--busy"]),
                         ("memory", ["--accent", "--muted"])):
        counts = [n for colour in colours for n in page.evaluate(
            _COUNT_COLOUR, [f'[data-testid="chart-primary-{key}"] canvas', css_var(page, colour)])]
        assert counts and max(counts) > 0, key
    # The timeline: the second of the cold load shows loading, the last one ready.
    loading = t.index(load_at)
    timeline = '[data-testid="timeline-primary"]'
    assert page.evaluate(_TIMELINE_AT, [timeline, loading, len(t)]) == css_var(page, "--busy")
    assert s["state"][-1] == "ready"
    assert page.evaluate(_TIMELINE_AT, [timeline, len(t) - 1, len(t)]) == css_var(page, "--ready")
    label = page.get_by_test_id("timeline-primary").get_attribute("aria-label") or ""
    assert "loading" in label and "ready" in label
    # Hovering a second names its state.
    box = page.get_by_test_id("timeline-primary").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * (loading + 0.5) / len(t), box["y"] + box["height"] / 2)
    assert (page.get_by_test_id("timeline-primary").get_attribute("title") or "").endswith(s["state"][loading])
    # Every slot has its panel; an unused one is drawn too (all zeros, offline).
    for slot in ("embed", "stt", "tts"):
        assert page.get_by_test_id(f"activity-{slot}").count() == 1

    # The slot's own page shows the same panel for that slot only.
    page.get_by_test_id("nav-slots").click()
    page.get_by_test_id("slot-link-primary").click()
    detail = page.get_by_test_id("detail-activity")
    detail.get_by_test_id("chart-primary-requests").locator("canvas").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert detail.locator("[data-slot]").count() == 1
    board.shot("slot-detail-activity")


def test_the_vendored_chart_library_is_served_from_the_package_with_its_licence(hal0_factory: Any) -> None:
    from importlib import resources

    hal0: Hal0 = hal0_factory(None).start()
    page = hal0.client.get("/").text
    assert 'src="/dashboard/vendor/uPlot.iife.min.js"' in page
    for asset, kind in (("vendor/uPlot.iife.min.js", "text/javascript"), ("vendor/uPlot.min.css", "text/css")):
        resp = hal0.client.get(f"/dashboard/{asset}")
        assert resp.status_code == 200, asset
        assert resp.headers["content-type"].startswith(kind)
    assert "uPlot" in hal0.client.get("/dashboard/vendor/uPlot.iife.min.js").text
    licence = resources.files("hal0").joinpath("dashboard", "vendor", "uPlot.LICENSE").read_text()
    assert "The MIT License" in licence and "Leon Sorokin" in licence
