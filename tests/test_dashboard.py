"""The dashboard end to end: the real API as a subprocess, real llama-server backends, and the page driven in
headless Chromium (Debian's package, through Playwright; no browser is downloaded at test time).
Screenshots land in test-artifacts/dashboard/.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hal0, wait_until

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the browser tests skip (or fail in CI) with the reason
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = os.environ.get("HAL0_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
#: How long the page may take to show something the API has already done.
UI_TIMEOUT_MS = 15_000


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: the set-up installs Debian's chromium and the playwright package in CI")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not HAVE_PLAYWRIGHT:
        _missing("the playwright package is not installed (pip install playwright; never `playwright install`)")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HAL0_CHROMIUM)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Dashboard:
    """One browser tab on the dashboard of one hal0, failing the test on any script error in the page."""

    def __init__(self, browser: Browser, hal0: Hal0, viewport: dict[str, int], color_scheme: str) -> None:
        self.hal0 = hal0
        self.context = browser.new_context(viewport=viewport, color_scheme=color_scheme)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        # Network failures are the browser's own report (an API restart causes them on purpose), not the page's.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource: net::"):
            self.errors.append(msg.text)

    def open(self, fragment: str = "#/slots") -> Page:
        self.page.goto(f"{self.hal0.url}/{fragment}")
        # The page marks itself ready once its event stream is open and the first state is in.
        self.page.wait_for_selector("body[data-ready='true']", timeout=UI_TIMEOUT_MS)
        return self.page

    def shot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def dashboard(browser: Browser) -> Iterator[Any]:
    made: list[Dashboard] = []

    def make(hal0: Hal0, viewport: dict[str, int] | None = None, color_scheme: str = "light") -> Dashboard:
        board = Dashboard(browser, hal0, viewport or LAPTOP, color_scheme)
        made.append(board)
        return board

    yield make
    errors = [e for board in made for e in board.errors]
    for board in made:
        board.close()
    assert not errors, f"script errors in the page: {errors}"


# -- helpers ------------------------------------------------------------------------------------------------------
def assign(hal0: Hal0, slot: str, ref: str) -> None:
    resp = hal0.client.put(f"/api/slots/{slot}/model", json={"model": ref})
    assert resp.status_code == 200, resp.text


def chat(hal0: Hal0, model: str, text: str = "hi") -> httpx.Response:
    return hal0.client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}]})


def watch_badge(page: Page, slot: str) -> None:
    """Record every state the badge shows, with the browser's clock, however briefly it shows it."""
    page.evaluate("""(slot) => {
        const badge = document.querySelector(`[data-testid="slot-state-${slot}"]`);
        window.__badge = [{state: badge.dataset.state, at: Date.now() / 1000}];
        new MutationObserver(() => {
            const state = badge.dataset.state;
            if (window.__badge.at(-1).state !== state) window.__badge.push({state, at: Date.now() / 1000});
        }).observe(badge, {attributes: true, attributeFilter: ["data-state"]});
    }""", slot)


def badge_states(page: Page) -> list[dict[str, Any]]:
    states: list[dict[str, Any]] = page.evaluate("window.__badge")
    return states


# -- serving the page ------------------------------------------------------------------------------------------
def test_the_page_and_its_assets_are_served_by_the_api_from_the_package(hal0_factory: Any) -> None:
    hal0: Hal0 = hal0_factory(None).start()
    page = hal0.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="/dashboard/app.js"' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page must load nothing remote"
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        resp = hal0.client.get(f"/dashboard/{asset}")
        assert resp.status_code == 200, asset
        assert resp.headers["content-type"].startswith(kind)
        assert "connect-src 'self'" in resp.headers["content-security-policy"]
    assert "EventSource(" in hal0.client.get("/dashboard/app.js").text
    for bad in ("/dashboard/nope.js", "/dashboard/../api/app.py", "/dashboard/%2e%2e/__init__.py",
                "/dashboard/.hidden.js", "/dashboard/index.py"):
        resp = hal0.client.get(bad)
        assert resp.status_code == 404, bad
        assert resp.json()["error"]["code"] == "not_found"


# -- slots --------------------------------------------------------------------------------------------------------
def test_loading_a_slot_turns_its_badge_warming_then_ready_within_a_second_of_each_transition(
        hal0: Hal0, large_model: Path, dashboard: Any) -> None:
    hal0.models.import_file("large", large_model, link=True, slot_type="chat")
    hal0.start()
    assign(hal0, "primary", "large")
    board = dashboard(hal0)
    page = board.open()

    badge = page.get_by_test_id("slot-state-primary")
    expect(badge).to_have_attribute("data-state", "offline")
    expect(page.get_by_test_id("slot-card-primary")).to_contain_text("large")
    board.shot("slots-offline")
    watch_badge(page, "primary")

    page.get_by_test_id("slot-load-primary").click()
    expect(badge).to_have_attribute("data-state", "warming", timeout=UI_TIMEOUT_MS)
    board.shot("slots-warming")
    expect(badge).to_have_attribute("data-state", "ready", timeout=60_000)
    board.shot("slots-ready")

    seen = badge_states(page)
    states = [s["state"] for s in seen]
    assert states[0] == "offline" and states[-1] == "ready", states
    assert states.index("warming") < states.index("ready"), states
    # Each badge change came within a second of the transition the API recorded.
    history = {h["to"]: h["time"] for h in hal0.slot("primary")["history"]}
    for entry in seen[1:]:
        lag = entry["at"] - history[entry["state"]]
        assert -0.5 < lag < 1.0, (entry, history)

    card = page.get_by_test_id("slot-card-primary")
    snapshot = hal0.slot("primary")
    expect(card).to_contain_text(f"pid {snapshot['pid']}")
    expect(card).to_contain_text(str(snapshot["port"]))
    expect(card).to_contain_text("llama.cpp")
    expect(page.get_by_test_id("announcer")).to_contain_text("ready")
    expect(page.get_by_test_id("slot-unload-primary")).to_be_enabled()
    expect(page.get_by_test_id("slot-load-primary")).to_be_disabled()

    page.get_by_test_id("slot-unload-primary").click()
    expect(badge).to_have_attribute("data-state", "offline", timeout=UI_TIMEOUT_MS)
    assert hal0.slot("primary")["state"] == "offline"


def test_a_broken_slot_shows_its_structured_error_on_its_card_and_in_its_detail(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_broken_model("broken", model_files["tiny"], model_files["corrupt"])
    hal0.start()
    assign(hal0, "primary", "broken")
    board = dashboard(hal0)
    page = board.open()

    page.get_by_test_id("slot-load-primary").click()
    badge = page.get_by_test_id("slot-state-primary")
    expect(badge).to_have_attribute("data-state", "error", timeout=60_000)
    error = hal0.slot("primary")["error"]
    box = page.get_by_test_id("slot-error-primary")
    expect(box).to_be_visible()
    expect(page.get_by_test_id("slot-error-primary-code")).to_have_text("backend_exited")
    expect(page.get_by_test_id("slot-error-primary-message")).to_have_text(error["message"])
    expect(page.get_by_test_id("slot-error-primary-exit")).to_have_text(f"exit code {error['detail']['exit_code']}")
    expect(page.get_by_test_id("slot-error-primary-log")).to_contain_text("failed to load model")
    expect(page.get_by_test_id("announcer")).to_contain_text("error")
    board.shot("slots-error")

    page.get_by_test_id("slot-link-primary").click()
    expect(page.get_by_test_id("view-slot")).to_be_visible()
    expect(page.get_by_test_id("detail-state")).to_have_attribute("data-state", "error")
    expect(page.get_by_test_id("detail-error-code")).to_have_text("backend_exited")
    history = page.get_by_test_id("history-entry")
    expect(history.first).to_contain_text("error")
    expect(page.get_by_test_id("detail-config")).to_contain_text("broken")
    expect(page.get_by_test_id("detail-logs")).to_contain_text("failed to load model", timeout=UI_TIMEOUT_MS)
    board.shot("slot-detail-error")

    # Dismissing the error returns the slot to offline, live.
    page.get_by_test_id("detail-unload-primary").click()
    expect(page.get_by_test_id("detail-state")).to_have_attribute("data-state", "offline", timeout=UI_TIMEOUT_MS)
    expect(page.get_by_test_id("detail-error")).to_have_count(0)


# -- decisions -------------------------------------------------------------------------------------------------
def test_requests_appear_as_decision_rows_newest_first_filterable_and_openable(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    assert hal0.client.post("/api/slots/primary/load").status_code == 200
    board = dashboard(hal0)
    page = board.open("#/logs")

    rows = page.get_by_test_id("decision-row")
    expect(rows).to_have_count(0)
    for i in range(3):
        assert chat(hal0, "primary", f"hello {i}").status_code == 200
        expect(rows).to_have_count(i + 1, timeout=UI_TIMEOUT_MS)
    assert chat(hal0, "no-such-model").status_code == 404
    expect(rows).to_have_count(4, timeout=UI_TIMEOUT_MS)

    newest = rows.first
    expect(newest).to_contain_text("no-such-model")
    expect(newest).to_have_attribute("data-outcome", "rejected:model_not_found")
    ok = rows.nth(1)
    expect(ok).to_contain_text("/v1/chat/completions")
    expect(ok).to_have_attribute("data-slot", "primary")
    expect(ok).to_have_attribute("data-outcome", "ok")
    expect(ok).to_contain_text("ms")
    board.shot("decisions")

    page.get_by_test_id("filter-outcome").select_option("ok")
    expect(rows).to_have_count(3)
    page.get_by_test_id("filter-outcome").select_option("")
    page.get_by_test_id("filter-slot").select_option("primary")
    expect(rows).to_have_count(3)
    page.get_by_test_id("filter-slot").select_option("")
    expect(rows).to_have_count(4)

    # Keyboard: focus a row, Enter opens the whole record; Escape closes it.
    record = hal0.client.get("/api/decisions", params={"limit": 1}).json()["data"][0]
    rows.first.focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_test_id("record-dialog")
    expect(dialog).to_be_visible()
    expect(page.get_by_test_id("record-body")).to_contain_text(record["request_id"])
    expect(page.get_by_test_id("record-body")).to_contain_text('"candidates"')
    board.shot("decision-record", full_page=False)
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # The slot's detail lists its own decisions.
    page.goto(f"{hal0.url}/#/slots/primary")
    expect(page.get_by_test_id("slot-decision-row")).to_have_count(3, timeout=UI_TIMEOUT_MS)
    expect(page.get_by_test_id("detail-state")).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("detail-logs")).not_to_be_empty(timeout=UI_TIMEOUT_MS)
    board.shot("slot-detail-ready")


def test_the_playground_streams_a_chat_reply_from_a_slot(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    board = dashboard(hal0)
    page = board.open("#/playground")

    page.get_by_test_id("play-slot").select_option("primary")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_test_id("play-message").fill("Tell me a story.")
    page.get_by_test_id("play-send").click()
    # The slot is cold: the request itself loads it, and the reply streams in once it is ready.
    output = page.get_by_test_id("play-output")
    expect(output).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.get_by_test_id("play-text")).not_to_be_empty()
    expect(page.get_by_test_id("play-stats")).to_contain_text("chunks")
    expect(page.get_by_test_id("play-error")).to_have_count(0)
    board.shot("playground")

    wait_until(lambda: hal0.client.get("/api/decisions").json()["data"], 10, "the playground's decision")
    decision = hal0.client.get("/api/decisions").json()["data"][0]
    assert decision["slot"] == "primary" and decision["outcome"] == "ok", decision
    page.get_by_test_id("nav-slots").click()
    expect(page.get_by_test_id("slot-state-primary")).to_have_attribute("data-state", "ready")


def test_the_page_reconnects_after_an_api_restart_and_stays_live(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    assert hal0.client.post("/api/slots/primary/load").status_code == 200
    board = dashboard(hal0)
    page = board.open()
    connection = page.get_by_test_id("connection")
    expect(connection).to_have_attribute("data-state", "live")
    expect(page.get_by_test_id("slot-state-primary")).to_have_attribute("data-state", "ready")

    hal0.kill()
    expect(connection).to_have_attribute("data-state", "down", timeout=UI_TIMEOUT_MS)
    board.shot("reconnecting", full_page=False)
    hal0.start()
    expect(connection).to_have_attribute("data-state", "live", timeout=UI_TIMEOUT_MS)
    # The backend outlived the API and was adopted; the page still follows it live.
    expect(page.get_by_test_id("slot-state-primary")).to_have_attribute("data-state", "ready")
    assert chat(hal0, "primary").status_code == 200
    page.get_by_test_id("nav-logs").click()
    expect(page.get_by_test_id("decision-row")).to_have_count(1, timeout=UI_TIMEOUT_MS)


# -- models ------------------------------------------------------------------------------------------------------
def test_the_models_view_lists_installed_models_with_metadata_and_the_loadouts(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.add_model("tiny-embed", model_files["embed"], slot_type="embed")
    hal0.start()
    assign(hal0, "primary", "tiny")
    board = dashboard(hal0)
    page = board.open("#/models")

    rows = page.get_by_test_id("model-row")
    expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
    tiny = page.locator("[data-testid='model-row'][data-ref='tiny']")
    expect(tiny).to_contain_text("gguf")
    expect(tiny).to_contain_text("llama")
    expect(tiny).to_contain_text("primary")
    expect(tiny).to_contain_text("KiB")
    loadouts = hal0.client.get("/api/loadouts").json()["loadouts"]
    for lo in loadouts:
        expect(page.get_by_test_id(f"apply-{lo['name']}")).to_be_visible()
    expect(page.get_by_test_id("pull-list")).to_contain_text("No pulls in flight")
    board.shot("models")


def test_the_page_reads_well_on_a_phone_and_in_dark_mode(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_broken_model("broken", model_files["tiny"], model_files["corrupt"])
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assign(hal0, "primary", "tiny")
    assign(hal0, "embed", "broken")
    assert hal0.client.post("/api/slots/primary/load").status_code == 200
    assert hal0.client.post("/api/slots/embed/load").status_code == 503
    assert chat(hal0, "primary").status_code == 200

    phone = dashboard(hal0, PHONE)
    page = phone.open()
    expect(page.get_by_test_id("slot-state-primary")).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("slot-state-embed")).to_have_attribute("data-state", "error")
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the slots view scrolls sideways on a phone: {width}"
    phone.shot("phone-slots")
    page.get_by_test_id("nav-logs").click()
    expect(page.get_by_test_id("decision-row")).to_have_count(1)
    phone.shot("phone-decisions")

    dark = dashboard(hal0, LAPTOP, "dark")
    page = dark.open()
    expect(page.get_by_test_id("slot-state-embed")).to_have_attribute("data-state", "error")
    dark.shot("dark-slots")


def test_the_memory_view_draws_each_device_budget_with_every_slot_share_from_the_api(
        hal0: Hal0, model_files: dict[str, Path], dashboard: Any) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("pin", 'type = "chat"\nmodel = "tiny"\npinned = true\n')
    hal0.start(env={"HAL0_MEMORY_BUDGET_MB": "400"})
    assign(hal0, "primary", "tiny")
    for slot in ("primary", "pin"):
        assert hal0.client.post(f"/api/slots/{slot}/load").status_code == 200
    board = dashboard(hal0)
    page = board.open("#/slots")
    # Each card shows what its backend holds (measured once it runs) beside its estimate.
    expect(page.get_by_test_id("slot-memory-primary")).to_contain_text("measured", timeout=UI_TIMEOUT_MS)
    expect(page.get_by_test_id("slot-memory-primary")).to_contain_text("estimated")
    page = board.open("#/memory")
    host = page.get_by_test_id("mem-device-host")
    expect(host).to_be_visible(timeout=UI_TIMEOUT_MS)
    hw = hal0.client.get("/api/hardware").json()
    assert host.get_attribute("data-budget") == str(400 << 20) == str(hw["budgets"]["host"]["budget_bytes"])
    assert host.get_attribute("data-total") == str(hw["budgets"]["host"]["total_bytes"])
    held = {h["slot"]: h for h in hw["holdings"]}
    assert set(held) == {"primary", "pin"}
    for slot, holding in held.items():
        seg = page.get_by_test_id(f"mem-seg-host-{slot}")
        expect(seg).to_be_visible()
        # The bar is the API's numbers (RSS moves a little between the page's read and the test's).
        shown = int(seg.get_attribute("data-bytes") or 0)
        assert abs(shown - holding["bytes"]["host"]) <= holding["bytes"]["host"] * 0.05, (slot, shown, holding)
        assert seg.get_attribute("data-measured") == "true"
        width = seg.evaluate("el => el.getBoundingClientRect().width / el.parentElement.getBoundingClientRect().width")
        assert abs(width - shown / hw["budgets"]["host"]["total_bytes"]) < 0.01
    expect(host).to_contain_text("pinned")
    board.shot("memory")
