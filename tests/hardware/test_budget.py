"""Budgets per device and the admission plan: pure rules, no backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal0.errors import ConfigError, InvalidRequest
from hal0.hardware.budget import (
    GIB,
    HOST,
    MIB,
    BudgetSettings,
    DeviceBudget,
    Holding,
    choose_gpu,
    default_reserve,
    device_budgets,
    plan,
)
from hal0.hardware.inventory import Gpu, HostMemory, Inventory
from hal0.hardware.placement import Placement, launch_args, launch_env, requested_gpus, validate_device
from hal0.settings import load_settings
from hal0.slots.config import SlotConfig


def machine(total: int = 32 * GIB, available: int = 30 * GIB, gpus: tuple[tuple[int, int], ...] = ()) -> Inventory:
    mem = HostMemory(total, available, "meminfo", total, None)
    return Inventory("test cpu", 8, mem, tuple(Gpu(i, "nvidia", f"gpu{i}", t, u) for i, (t, u) in enumerate(gpus)),
                     ())


def held(slot: str, host: int = 0, *, gpu0: int = 0, age: float = 0.0, evictable: bool = True,
         busy: bool = True, pinned: bool = False) -> Holding:
    devices = {HOST: host} | ({"gpu:0": gpu0} if gpu0 else {})
    return Holding(slot, devices, True, "ready", evictable and not pinned, busy and not pinned, pinned, age)


def test_the_default_budget_is_the_total_less_a_reserve_and_settings_override_it() -> None:
    inv = machine(gpus=((16 * GIB, 1 * GIB),))
    b = device_budgets(inv, BudgetSettings())
    assert b[HOST].reserve_bytes == default_reserve(HOST, 32 * GIB) == int(3.2 * GIB)
    assert b[HOST].budget_bytes == 32 * GIB - b[HOST].reserve_bytes
    assert b["gpu:0"].reserve_bytes == 16 * GIB // 20 and b["gpu:0"].free_bytes == 15 * GIB
    assert default_reserve(HOST, 4 * GIB) == GIB and default_reserve(HOST, 512 * GIB) == 4 * GIB
    b = device_budgets(inv, BudgetSettings.from_mb(2048, None, ()))
    assert b[HOST].budget_bytes == 30 * GIB and b["gpu:0"].budget_bytes == 14 * GIB
    b = device_budgets(inv, BudgetSettings.from_mb(None, 1000, ((0, 5000),)))
    assert b[HOST].budget_bytes == 1000 * MIB and b["gpu:0"].budget_bytes == 5000 * MIB
    assert b[HOST].reserve_bytes == 32 * GIB - 1000 * MIB


def budgets(host: int, free: int | None = None, gpu: int = 0) -> dict[str, DeviceBudget]:
    out = {HOST: DeviceBudget(HOST, host * 2, host, host, free if free is not None else host)}
    if gpu:
        out["gpu:0"] = DeviceBudget("gpu:0", gpu, 0, gpu, gpu)
    return out


def test_a_load_that_fits_unloads_nothing() -> None:
    assert plan({HOST: 300}, budgets(1000), [held("a", 600)]).evict == ()
    assert plan({HOST: 300}, budgets(1000), [held("a", 600)]).fits


def test_the_least_recently_used_idle_slots_go_first_and_only_as_many_as_needed() -> None:
    holdings = [held("old", 300, age=1), held("new", 300, age=3), held("mid", 300, age=2)]
    verdict = plan({HOST: 500}, budgets(1000), holdings)
    assert verdict.fits and verdict.evict == ("old", "mid")


def test_pinned_and_serving_slots_are_never_chosen_and_a_serving_one_means_wait() -> None:
    holdings = [held("pinned", 400, age=0, pinned=True), held("serving", 400, age=1, evictable=False),
                held("idle", 100, age=2)]
    verdict = plan({HOST: 500}, budgets(1000), holdings)
    assert not verdict.fits and verdict.wait == ("serving",)
    verdict = plan({HOST: 900}, budgets(1000), holdings)
    assert not verdict.fits and verdict.wait == () and verdict.short == {HOST: 900 - 600}


def test_free_memory_below_the_budget_counts_too() -> None:
    # Something outside hal0 holds memory: the budget says 1000 free, the OS says 200.
    verdict = plan({HOST: 300}, budgets(1000, free=200), [])
    assert not verdict.fits and verdict.short == {HOST: 100}


def test_only_slots_on_the_short_device_are_unloaded() -> None:
    holdings = [held("cpu-only", 500, age=0), held("on-gpu", 10, gpu0=900, age=1)]
    verdict = plan({HOST: 10, "gpu:0": 500}, budgets(1000, gpu=1000), holdings)
    assert verdict.fits and verdict.evict == ("on-gpu",)


def test_a_device_that_is_not_there_cannot_fit() -> None:
    verdict = plan({"gpu:3": 1}, budgets(1000), [])
    assert not verdict.fits and verdict.short == {"gpu:3": 1}


def test_auto_placement_picks_the_gpu_with_most_room_that_fits() -> None:
    b = {HOST: DeviceBudget(HOST, 10, 0, 10_000, 10_000),
         "gpu:0": DeviceBudget("gpu:0", 0, 0, 1000, 1000), "gpu:1": DeviceBudget("gpu:1", 0, 0, 2000, 2000)}
    assert choose_gpu({0: 500, 1: 500}, b, [], 10) == 1
    holdings = [Holding("x", {"gpu:1": 1800}, True, "ready", False, False, False, 0)]
    assert choose_gpu({0: 500, 1: 500}, b, holdings, 10) == 0
    assert choose_gpu({0: 1500, 1: 1500}, b, holdings, 10) is None


def test_placement_settings_are_validated_and_become_arguments_and_variables() -> None:
    for good in ("auto", "cpu", "gpu", "gpu:0", "gpu:0,1"):
        assert validate_device(good) == good
    for bad in ("GPU", "gpu:", "gpu:a", "cuda:0", "gpu:0;rm", "", "gpu\n", "cpu\n"):
        with pytest.raises(InvalidRequest):
            validate_device(bad)
    assert requested_gpus("gpu:1,0,1") == (1, 0) and requested_gpus("gpu") is None
    one = Placement((1,), 20, explicit=True)
    assert launch_args(one, ()) == ["-ngl", "20"] and launch_args(one, ("-ngl", "5")) == []
    assert launch_env("cuda", one) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert launch_env("rocm", Placement((0, 1), 99, True)) == {"HIP_VISIBLE_DEVICES": "0,1"}
    assert launch_args(Placement((0, 1), 99, True), ()) == ["-ngl", "99", "--tensor-split", "1,1"]
    assert launch_args(Placement((0, 1), 99, True), ("-ts", "3,1")) == ["-ngl", "99"]
    assert launch_env("vulkan", one) == {"GGML_VK_VISIBLE_DEVICES": "1"}
    cpu = Placement((), 0, explicit=True)
    assert launch_env("cuda", cpu) == {"CUDA_VISIBLE_DEVICES": ""} and launch_args(cpu, ()) == ["-ngl", "0"]
    assert launch_env("cpu", one) == {} and launch_args(Placement(), ()) == [] and Placement().device == "cpu"


def test_slot_fields_for_memory_are_validated() -> None:
    cfg = SlotConfig.from_mapping({"name": "x", "device": "gpu:1", "gpu_layers": 12, "pinned": True,
                                   "group": "gpu0-share"})
    assert (cfg.device, cfg.gpu_layers, cfg.pinned, cfg.group) == ("gpu:1", 12, True, "gpu0-share")
    assert "device" not in SlotConfig(name="y").to_toml() and "pinned" not in SlotConfig(name="y").to_toml()
    for bad in ({"device": "npu"}, {"gpu_layers": -1}, {"gpu_layers": True}, {"pinned": "yes"},
                {"group": "Bad Name"}):
        with pytest.raises(InvalidRequest):
            SlotConfig.from_mapping({"name": "x", **bad})


def test_memory_settings_come_from_toml_and_the_environment(tmp_path: Path) -> None:
    env = {"HAL0_HOME": str(tmp_path), "HAL0_MEMORY_RESERVE_MB": "2048", "HAL0_GPU_MEMORY_BUDGET_MB": "0=8000,1=4000"}
    s = load_settings(env)
    assert s.memory_reserve_mb == 2048 and s.gpu_memory_budget_mb == ((0, 8000), (1, 4000))
    assert s.memory_budget_mb is None and s.memory_pressure_floor_mb == 512
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "hal0.toml").write_text('memory_budget_mb = 3000\n[gpu_memory_budget_mb]\n"0" = 100\n')
    s = load_settings({"HAL0_HOME": str(tmp_path)})
    assert s.memory_budget_mb == 3000 and s.gpu_memory_budget_mb == ((0, 100),)
    for bad in ({"HAL0_GPU_MEMORY_BUDGET_MB": "zero=1"}, {"HAL0_MEMORY_RESERVE_MB": "-5"},
                {"HAL0_GPU_MEMORY_BUDGET_MB": "0"}):
        with pytest.raises(ConfigError):
            load_settings({"HAL0_HOME": str(tmp_path), **bad})
