"""Loadouts: memory estimates, refusal when they cannot fit, apply = pull what is missing + assign."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal0.errors import InsufficientMemory, LoadoutNotFound
from hal0.hardware.budget import DeviceBudget
from hal0.registry import catalog
from hal0.registry.loadouts import MemInfo, apply_loadout, list_loadouts, machine_memory, plan_loadout
from hal0.registry.pull import Registry

from .conftest import FileServer

GIB = 1024**3


def serve_catalog_files(server: FileServer, ref: str) -> None:
    entry = catalog.lookup(ref)
    assert entry is not None
    for f in entry.files:
        server.add(f.source.rsplit("/", 1)[-1], 4096)


def test_loadouts_are_checked_against_the_largest_device_budget() -> None:
    host = DeviceBudget("host", 32 * GIB, 3 * GIB, 29 * GIB, 20 * GIB)
    gpu = DeviceBudget("gpu:0", 48 * GIB, GIB, 47 * GIB, 40 * GIB)
    assert machine_memory({"host": host}) == MemInfo(total=29 * GIB, available=20 * GIB, device="host")
    assert machine_memory({"host": host, "gpu:0": gpu}) == MemInfo(47 * GIB, 40 * GIB, "gpu:0")
    assert machine_memory().total > 0


def test_every_loadout_covers_the_builtin_slots() -> None:
    names = {lo.name for lo in list_loadouts()}
    assert {"cpu-laptop", "gpu-16gb", "unified-128gb"} <= names
    for lo in list_loadouts():
        assert [s.slot for s in lo.slots] == ["primary", "embed", "stt", "tts"]


def test_a_loadout_too_big_for_the_machine_is_refused(registry: Registry) -> None:
    plan = plan_loadout(registry, "unified-128gb", MemInfo(total=8 * GIB, available=6 * GIB))
    assert not plan.fits and plan.estimate_bytes > 8 * GIB and plan.warnings
    with pytest.raises(LoadoutNotFound):
        plan_loadout(registry, "no-such-tier")


async def test_refused_apply_pulls_and_assigns_nothing(registry: Registry) -> None:
    assigned: list[tuple[str, str]] = []

    async def assign(slot: str, ref: str) -> None:
        assigned.append((slot, ref))

    with pytest.raises(InsufficientMemory) as exc:
        await apply_loadout(registry, "gpu-16gb", assign, memory=MemInfo(total=2 * GIB, available=GIB))
    assert exc.value.status == 409 and assigned == [] and registry.list_models() == []


async def test_apply_pulls_missing_models_and_assigns_every_slot(
        registry: Registry, file_server: FileServer, tmp_path: Path) -> None:
    for ref in ("qwen2.5-0.5b-instruct-q4_k_m", "bge-small-en-v1.5-q8_0"):
        serve_catalog_files(file_server, ref)
    # The speech models are installed already (their catalog sources are not on Hugging Face, so not served here).
    voice = tmp_path / "kokoro-v1.0.int8.onnx"
    voice.write_bytes(b"onnx" * 100)
    registry.import_file("kokoro-82m-int8", voice, slot_type="tts", provider="kokoro")
    encoder = tmp_path / "encoder_model.ort"
    encoder.write_bytes(b"ort" * 100)
    registry.import_file("moonshine-tiny-en", encoder, slot_type="stt", provider="moonshine")
    assigned: dict[str, str] = {}

    async def assign(slot: str, ref: str) -> None:
        assigned[slot] = ref

    memory = MemInfo(total=8 * GIB, available=6 * GIB)
    report = await apply_loadout(registry, "cpu-tiny", assign, memory=memory)
    assert sorted(report.pulled) == ["bge-small-en-v1.5-q8_0", "qwen2.5-0.5b-instruct-q4_k_m"]
    assert sorted(report.already_installed) == ["kokoro-82m-int8", "moonshine-tiny-en"]
    assert assigned == {"primary": "qwen2.5-0.5b-instruct-q4_k_m", "embed": "bge-small-en-v1.5-q8_0",
                        "stt": "moonshine-tiny-en", "tts": "kokoro-82m-int8"}
    # Verified against the hub's X-Linked-ETag on the way in; catalog hints land in the manifest.
    assert registry.get("qwen2.5-0.5b-instruct-q4_k_m").slot_type == "chat"
