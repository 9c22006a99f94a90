"""API restart: SIGKILL the control plane while a model is loaded, start it again, and time until it serves a
request again; and whether the model had to be loaded again (hal0 adopts its running backend; the peers lose
theirs, or never owned one). Interleaved rounds. Beside them, the floor under any Python control plane
(`bench/floor.py`: the interpreter with asyncio and uvloop, answering at once) and the same floor with hal0's
start-path imports, restarted the same way: what of hal0's figure is the runtime, its imports, the rest of its start.
With `--stream` the request polled is a streamed chat, timed to its first token (what a chat client waits for; the
floors, which have no model, are left out). `--before SRC` adds a second hal0, run from another tree's `src`
(`git worktree add`), restarted in the same rounds: a paired comparison of two trees on the same machine at the
same moment. `hal0-socket` is hal0 restarted on a listening socket the bench holds and passes on, as systemd's
hal0-api.socket does in production: the polled request waits in the backlog while no API runs instead of being
refused and sent again. Run on demand: `python -m bench.restart [--stream] [--before SRC]`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    Bare,
    Hal0,
    LiteLLM,
    Router,
    alive,
    children,
    first_token_status,
    free_port,
    kill_pid,
    make_models,
    med,
    pids_matching,
    save,
    small_status,
    spread,
    wait_http,
    zombie,
)

#: Issue 18's target: an API killed with SIGKILL serves again within this, with no reload.
TARGET_MS = 150.0


async def serves_again(url: str, model: str, timeout: float = 120, *, stream: bool = False) -> float:
    """Poll a small completion every 5 ms until it is answered 200 (with `stream`, a streamed chat until its first
    token comes); when that was (perf_counter)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            poll = first_token_status if stream else small_status
            status, at = await poll(http, url, model)
            if status == 200:
                return at
            await asyncio.sleep(0.005)
    raise SystemExit(f"{url} did not serve again within {timeout}s")


class Floor:
    """`bench/floor.py` (with `--hal0-imports` when `hal0_imports`): binds, imports, answers every request 200."""

    FILE = Path(__file__).with_name("floor.py")

    def __init__(self, env: dict[str, str], hal0_imports: bool) -> None:
        self.env = env
        self.argv = [sys.executable, str(self.FILE), str(free_port())] + (["--hal0-imports"] if hal0_imports else [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.argv[2]}"

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def start(self) -> Floor:
        self.spawn()
        await serves_again(self.url, "floor", timeout=30)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


async def restart_floor(floor: Floor) -> dict[str, Any]:
    floor.kill(signal.SIGKILL)
    killed = time.perf_counter()
    floor.spawn()
    served = await serves_again(floor.url, "floor")
    return {"serves_again_ms": (served - killed) * 1000, "reloaded": None, "backend_survived": None}


async def restart_hal0(hal0: Hal0, slot: str, stream: bool) -> dict[str, Any]:
    await hal0.load(slot)
    before = pids_matching(str(hal0.home))
    hal0.kill(signal.SIGKILL)
    killed = time.perf_counter()
    hal0.spawn()
    served = await serves_again(hal0.url, slot, stream=stream)
    after = pids_matching(str(hal0.home))
    return {"serves_again_ms": (served - killed) * 1000, "reloaded": after != before,
            "backend_survived": bool(before & after),
            "backend_alone_ms": await backend_alone(f"http://127.0.0.1:{hal0.slot_ports[slot]}", slot, stream)}


async def backend_alone(url: str, model: str, stream: bool) -> float:
    """The polled request sent straight to the backend, right after the round: what of `serves_again_ms` is the
    model's own answer (on a small machine, a large model's decode is a good part of a restart)."""
    async with aiohttp.ClientSession() as http:
        sent = time.perf_counter()
        status, at = await (first_token_status if stream else small_status)(http, url, model)
    if status != 200:
        raise SystemExit(f"{url}: the backend answered {status}")
    return (at - sent) * 1000


async def restart_router(router: Router, model: str, stream: bool) -> dict[str, Any]:
    await router.load(model)
    before = set(children(router.pid))
    router.kill(signal.SIGKILL)
    killed = time.perf_counter()
    router.spawn()
    served = await serves_again(router.url, model, stream=stream)
    after = set(children(router.pid))
    survived = {pid for pid in before if alive(pid) and not zombie(pid)}
    for pid in survived:  # an orphan the new router does not know about: clean up
        kill_pid(pid)
    return {"serves_again_ms": (served - killed) * 1000, "reloaded": bool(after - before),
            "backend_survived": bool(survived)}


async def restart_litellm(litellm: LiteLLM, model: str, stream: bool) -> dict[str, Any]:
    assert litellm.proc is not None
    litellm.kill(signal.SIGKILL)
    killed = time.perf_counter()
    litellm.spawn()
    served = await serves_again(litellm.url, model, stream=stream)
    # LiteLLM never owned the backend (started by hand here), so it has nothing to reload.
    return {"serves_again_ms": (served - killed) * 1000, "reloaded": False, "backend_survived": True}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"polled": "streamed chat, first token" if args.stream else "small completion"}
    what = "first token" if args.stream else "serving again"
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models", large=not args.tiny_only)
        sizes = {"tiny": models["tiny-a"]}
        if not args.tiny_only:
            sizes["large"] = models["large"]
        hal0 = await Hal0(root / "hal0", sizes, {name: name for name in sizes}).start()
        # The same API with its port held across the restart, as under systemd (hal0-api.socket): the polled
        # request waits in the backlog while no API runs, instead of being refused and sent again.
        held = await Hal0(root / "hal0-held", sizes, {name: name for name in sizes}, held_socket=True).start()
        before = None
        if args.before:
            before = await Hal0(root / "hal0-before", sizes, {name: name for name in sizes},
                                PYTHONPATH=args.before).start()
        router = await Router(root, sizes, models_max=1).start()
        bare = Bare(root, models["tiny-a"], "tiny")
        litellm: LiteLLM | None = None
        floors: dict[str, Floor] = {}
        try:
            # The floors run with hal0's own environment (its interpreter, the same PYTHONPATH): the same imports.
            if not args.stream:
                floors["floor"] = await Floor(hal0.env, hal0_imports=False).start()
                floors["floor+imports"] = await Floor(hal0.env, hal0_imports=True).start()
            if LiteLLM.available():
                bare.spawn()
                assert bare.proc is not None
                await wait_http(f"{bare.url}/health", bare.proc, 30, bare.log)
                litellm = await LiteLLM(root, {"tiny": bare.url}).start()
            for size in sizes:
                # LiteLLM owns no backend, so the model's size changes nothing for it: measured with tiny only.
                planes = ["hal0", "hal0-socket"] + (["hal0-before"] if before is not None else []) + ["router"]
                planes += ["litellm"] if litellm is not None and size == "tiny" else []
                planes += list(floors) if size == "tiny" else []  # a floor has no model: measured once
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in planes}
                rounds = args.rounds if size == "tiny" else args.large_rounds
                for i in range(rounds):
                    order = planes[i % len(planes):] + planes[:i % len(planes)]
                    for name in order:
                        if name == "hal0":
                            runs[name].append(await restart_hal0(hal0, size, args.stream))
                        elif name == "hal0-socket":
                            runs[name].append(await restart_hal0(held, size, args.stream))
                        elif name == "hal0-before" and before is not None:
                            runs[name].append(await restart_hal0(before, size, args.stream))
                        elif name == "router":
                            runs[name].append(await restart_router(router, size, args.stream))
                        elif name in floors:
                            runs[name].append(await restart_floor(floors[name]))
                        elif litellm is not None:
                            runs[name].append(await restart_litellm(litellm, "tiny", args.stream))
                out: dict[str, Any] = {}
                for name, rows in runs.items():
                    times = [r["serves_again_ms"] for r in rows]
                    out[name] = {"serves_again_ms": med(times), "reloaded": [r["reloaded"] for r in rows],
                                 "backend_survived": [r["backend_survived"] for r in rows], "rounds": rows}
                    if name in floors:
                        print(f"{size:<5} {name:<13} SIGKILL -> serving again {spread(times):<30} ms | "
                              + ("python, asyncio, uvloop" if name == "floor" else "the same + hal0's start imports"))
                        continue
                    alone = [r["backend_alone_ms"] for r in rows if "backend_alone_ms" in r]
                    if alone:
                        out[name]["backend_alone_ms"] = med(alone)
                    print(f"{size:<5} {name:<13} SIGKILL -> {what} {spread(times):<30} ms | model reloaded "
                          f"{out[name]['reloaded']} | backend survived {out[name]['backend_survived']}"
                          + (f" | of it the backend's own answer {med(alone):.1f} ms" if alone else ""))
                if before is not None:
                    # Round by round, the two trees were restarted one right after the other.
                    paired = [a["serves_again_ms"] - b["serves_again_ms"]
                              for a, b in zip(runs["hal0"], runs["hal0-before"], strict=True)]
                    out["paired_minus_before_ms"] = med(paired)
                    print(f"{size:<5} hal0 - hal0-before, paired by round: median {med(paired):+.1f} ms "
                          f"(range {min(paired):+.1f} to {max(paired):+.1f})")
                results[size] = out
        finally:
            for floor in floors.values():
                floor.kill()
            if litellm is not None:
                litellm.stop()
            bare.stop()
            router.stop()
            hal0.stop()
            held.stop()
            if before is not None:
                before.stop()
    sizes_run = [out for out in results.values() if isinstance(out, dict)]
    ok = not any(r for out in sizes_run for plane in ("hal0", "hal0-socket") for r in out[plane]["reloaded"])
    fast = all(out["hal0"]["serves_again_ms"] <= TARGET_MS for out in sizes_run)
    held_fast = all(out["hal0-socket"]["serves_again_ms"] <= TARGET_MS for out in sizes_run)
    verdicts = {"restart with no reload": ok, f"SIGKILL -> {what} <= {TARGET_MS:g} ms": fast,
                f"SIGKILL -> {what} <= {TARGET_MS:g} ms, socket held (systemd)": held_fast}
    for what, met in verdicts.items():
        print(f"  {'met ' if met else 'MISS'}  {what}")
    results["verdicts"] = verdicts
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="restarts per control plane with the tiny model")
    p.add_argument("--large-rounds", type=int, default=2, help="restarts per control plane with the large model")
    p.add_argument("--tiny-only", action="store_true", help="skip the large (about 2 s to load) model")
    p.add_argument("--stream", action="store_true",
                   help="poll with a streamed chat and time its first token (results: restart_stream.json)")
    p.add_argument("--before", metavar="SRC", type=lambda src: str(Path(src).resolve()),
                   help="also restart a hal0 run from this tree's src, in the same rounds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    save("restart_stream" if args.stream else "restart", asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
