"""Memory admission with real llama-servers: budgets, LRU eviction, pinned and serving slots, refusals, groups,
concurrent cold loads that never hold more than the budget, and the pressure watcher."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from hal0.hardware.budget import HOST, MIB
from hal0.hardware.estimate import LoadSettings, estimate_file
from hal0.hardware.inventory import read_host_memory
from hal0.hardware.measure import read_process_memory
from hal0.hardware.placement import Placement
from hal0.slots.memory import split
from tests.conftest import Hal0, wait_until
from tests.test_dispatch import event_stream, read_until

CTX = 8192
SLOT = f'type = "chat"\nmodel = "tiny"\nctx_size = {CTX}\n'


def need_mib(model: Path) -> float:
    """What admission counts for one tiny slot (the same estimate hal0 makes)."""
    return split(estimate_file(model, LoadSettings.from_args(CTX, ())), Placement())[HOST] / MIB


def client(hal0: Hal0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hal0.url}/v1", api_key="x", max_retries=0, timeout=300)


def ask(hal0: Hal0, slot: str, max_tokens: int = 2) -> None:
    client(hal0).completions.create(model=slot, prompt="hi", max_tokens=max_tokens)


def evictions(hal0: Hal0) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = hal0.client.get("/api/decisions", params={"outcome": "evicted"}).json()["data"]
    return data


def loaded(hal0: Hal0) -> set[str]:
    return {s["name"] for s in hal0.client.get("/api/slots").json()["data"]
            if s["state"] in ("ready", "serving", "idle", "starting", "warming")}


def start(hal0: Hal0, model: Path, slots: dict[str, str], budget_slots: float, **env: str) -> float:
    hal0.add_model("tiny", model)
    for name, extra in slots.items():
        base = SLOT
        for key in ("ctx_size", "model"):
            if key in extra:
                base = "\n".join(line for line in base.splitlines() if not line.startswith(key)) + "\n"
        hal0.write_slot_config(name, base + extra)
    per_slot = need_mib(model)
    hal0.start(env={"HAL0_MEMORY_BUDGET_MB": str(int(per_slot * budget_slots)), **env})
    return per_slot


@pytest.mark.llama
def test_loads_that_fit_stay_and_one_more_unloads_the_least_recently_used(hal0: Hal0,
                                                                        model_files: dict[str, Path]) -> None:
    start(hal0, model_files["tiny"], {"a": "", "b": "", "c": ""}, 2.5)
    ask(hal0, "a")
    ask(hal0, "b")
    assert loaded(hal0) == {"a", "b"} and evictions(hal0) == []
    ask(hal0, "a")  # b is now the least recently used
    ask(hal0, "c")
    assert loaded(hal0) == {"a", "c"}
    gone = hal0.slot("b")
    assert gone["state"] == "offline" and "make room for slot c" in gone["reason"]
    [record] = evictions(hal0)
    assert (record["slot"], record["reason"], record["endpoint"]) == ("b", "memory", "evict")
    assert record["detail"]["for_slot"] == "c" and record["detail"]["frees_bytes"]["host"] > 0
    assert record["detail"]["needs_bytes"]["host"] > 0
    body = hal0.client.get("/api/hardware").json()
    assert body["budgets"]["host"]["budget_bytes"] == int(need_mib(model_files["tiny"]) * 2.5) * MIB
    assert {h["slot"] for h in body["holdings"]} == {"a", "c"}
    assert all(h["measured"] for h in body["holdings"])
    assert hal0.slot("a")["memory"]["estimate"]["total_bytes"] > 0
    # /metrics has the same figures: each device's budget, what each slot holds there, the eviction by reason.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(hal0.client.get("/metrics").text) for s in f.samples}
    host_budget = body["budgets"]["host"]["budget_bytes"]
    assert samples[("hal0_device_memory_budget_bytes", (("device", "host"),))] == host_budget
    for slot in ("a", "c"):
        assert samples[("hal0_slot_device_memory_bytes", (("device", "host"), ("slot", slot)))] > 0
    assert ("hal0_slot_device_memory_bytes", (("device", "host"), ("slot", "b"))) not in samples
    assert samples[("hal0_evictions_total", (("reason", "memory"), ("slot", "b")))] == 1
    # The same figures travel on the event stream with every move of the slot (measured once a second).
    with event_stream(hal0, "slot") as events:
        deadline = time.monotonic() + 15
        while True:
            ask(hal0, "a")
            moves = read_until(events, lambda e: e.get("slot") == "a" and e.get("to") == "ready")
            memory = moves[-1]["record"]["memory"]
            if memory["measured"] is not None or time.monotonic() > deadline:
                break
        assert memory["estimate"]["total_bytes"] > 0 and memory["measured"]["rss_bytes"] > 0


@pytest.mark.llama
def test_a_load_that_cannot_fit_is_refused_before_anything_starts(hal0: Hal0, model_files: dict[str, Path]) -> None:
    start(hal0, model_files["tiny"], {"a": "pinned = true\n", "big": f"ctx_size = {CTX * 8}\n"}, 1.6)
    ask(hal0, "a")
    resp = hal0.client.post("/v1/chat/completions", json={"model": "big", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "insufficient_memory" and err["type"] == "invalid_request_error"
    assert "big" in err["message"] and "budget" in err["message"]
    detail = err["detail"]
    assert detail["needed_bytes"]["host"] > detail["budgets"]["host"]["budget_bytes"] > 0
    assert detail["free_bytes"]["host"] > 0 and [s["slot"] for s in detail["slots"]] == ["a"]
    assert "a" in detail["not_evictable"]
    # Refused before a process was spawned: the slot never left offline and has no backend log.
    assert hal0.slot("big")["state"] == "offline"
    assert not (hal0.home / "logs" / "slots" / "big.log").exists() or hal0.start_lines("big") == []
    assert loaded(hal0) == {"a"}
    api = hal0.client.post("/api/slots/big/load")
    assert api.status_code == 409 and api.json()["error"]["code"] == "insufficient_memory"
    # The estimate route says the same before anything is tried.
    fit = hal0.client.get("/api/slots/big/estimate").json()
    assert fit["fits"] is False and fit["device"] == "cpu"
    decision = hal0.client.get("/api/decisions", params={"slot": "big"}).json()["data"][0]
    assert decision["outcome"] == "rejected:insufficient_memory"
    # The catalog and the loadouts say so too, against the same budget (about 50 MiB here).
    entries = hal0.client.get("/api/catalog").json()["catalog"]
    assert entries and all(e["fits"] is False for e in entries if e["size"] and e["size"] > 64 << 20)
    plan = hal0.client.get("/api/loadouts/cpu-tiny").json()
    assert plan["fits"] is False and plan["memory"]["device"] == "host"
    assert plan["memory"]["total"] == hal0.client.get("/api/hardware").json()["budgets"]["host"]["budget_bytes"]


@pytest.mark.llama
def test_pinned_and_serving_slots_are_never_unloaded_a_load_waits_for_the_serving_one(
        hal0: Hal0, model_files: dict[str, Path], large_model: Path) -> None:
    hal0.add_model("big", large_model)
    tiny = need_mib(model_files["tiny"])
    # pin and busy fit with three quarters of a tiny slot to spare (RSS drifts a little); c only once busy is gone.
    budget = need_mib(large_model) + tiny * 1.75
    start(hal0, model_files["tiny"], {"pin": "pinned = true\n", "busy": 'model = "big"\n', "c": ""}, budget / tiny)
    ask(hal0, "busy")
    ask(hal0, "pin")  # busy is the least recently used, pin the most: pin must stay all the same
    finished: list[float] = []

    def long_request() -> None:
        client(hal0).completions.create(model="busy", prompt="hi", max_tokens=1500,
                                        extra_body={"ignore_eos": True})
        finished.append(time.monotonic())

    t = threading.Thread(target=long_request)
    t.start()
    wait_until(lambda: hal0.slot("busy")["state"] == "serving" or finished, 30, "busy to serve")
    assert not finished, "the long request ended before the test could load c beside it"
    ask(hal0, "c")  # waits until busy's request ends, then unloads busy (never pin)
    loaded_at = time.monotonic()
    t.join(120)
    assert finished and finished[0] <= loaded_at, "c loaded while busy was still serving"
    assert loaded(hal0) == {"pin", "c"}
    assert [e["slot"] for e in evictions(hal0)] == ["busy"]


@pytest.mark.llama
@pytest.mark.slow
def test_concurrent_cold_requests_never_hold_more_than_the_budget(hal0: Hal0, model_files: dict[str, Path]) -> None:
    per_slot = start(hal0, model_files["tiny"], {"a": "", "b": "", "c": ""}, 2.5)
    budget = int(per_slot * 2.5) * MIB
    samples: list[int] = []
    stop = threading.Event()

    def backends() -> list[int]:
        out = []
        for s in hal0.client.get("/api/slots").json()["data"]:
            if s["pid"] and s["state"] != "offline":
                out.append(s["pid"])
        return out

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for pid in backends():
                mem = read_process_memory(pid)
                total += mem.rss_bytes if mem else 0
            samples.append(total)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    errors: list[BaseException] = []

    def burst(slot: str) -> None:
        try:
            for _ in range(3):
                ask(hal0, slot, max_tokens=8)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=burst, args=(s,)) for s in ("a", "b", "c") for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    sampler.join()
    assert not errors, errors
    assert samples and max(samples) <= budget, (max(samples), budget)
    assert len(loaded(hal0)) <= 2
    assert evictions(hal0), "three slots in a budget for two swapped at least once"


@pytest.mark.llama
def test_loading_a_slot_of_an_exclusive_group_unloads_the_others(hal0: Hal0, model_files: dict[str, Path]) -> None:
    start(hal0, model_files["tiny"], {"g1": 'group = "gpu0"\n', "g2": 'group = "gpu0"\n', "free": ""}, 10)
    ask(hal0, "g1")
    ask(hal0, "free")
    ask(hal0, "g2")
    assert loaded(hal0) == {"g2", "free"}
    [record] = evictions(hal0)
    assert (record["slot"], record["reason"], record["detail"]["for_slot"]) == ("g1", "group", "g2")
    ask(hal0, "g1")
    assert loaded(hal0) == {"g1", "free"}


@pytest.fixture
def allocator() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def run(mib: int) -> subprocess.Popen[bytes]:
        # A real process that allocates and touches `mib` MiB, then holds it until killed.
        code = (f"import time\nb = bytearray({mib} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
                "print('held', flush=True)\ntime.sleep(3600)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        return proc

    yield run
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.llama
@pytest.mark.slow
def test_memory_pressure_from_outside_unloads_idle_slots_until_it_recovers(
        hal0: Hal0, model_files: dict[str, Path], allocator: Any) -> None:
    available = read_host_memory().available_bytes // MIB
    if available < 4096:
        pytest.skip(f"needs 4 GiB of available memory to push below a floor, has {available} MiB")
    floor = available - 1536
    start(hal0, model_files["tiny"], {"old": "", "new": "", "pin": "pinned = true\n"}, 10,
          HAL0_MEMORY_PRESSURE_FLOOR_MB=str(floor))
    for slot in ("old", "new", "pin"):
        ask(hal0, slot)
    hog = allocator(3072)
    wait_until(lambda: "old" not in loaded(hal0), 20, "the idle slot to be unloaded under pressure")
    first = evictions(hal0)[-1]
    assert first["slot"] == "old" and first["reason"] == "pressure" and first["detail"]["device"] == "host"
    assert first["detail"]["floor_bytes"] == floor * MIB
    wait_until(lambda: "new" not in loaded(hal0), 20, "the next idle slot to be unloaded")
    assert "pin" in loaded(hal0)
    hog.kill()
    hog.wait()
    wait_until(lambda: read_host_memory().available_bytes // MIB > floor + 512, 20, "memory to recover")
    ask(hal0, "old")
    assert {"old", "pin"} <= loaded(hal0)
