"""Several hal0 nodes on one machine: one network namespace each, joined by a bridge in a hub namespace.

Addresses are 10.231.N.0/24 inside the namespaces only; nothing is routed out of them. The test process
reaches a node from worker threads that entered the node's namespace (setns), so its sockets live there too.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx

from hal0.registry.store import ModelStore
from tests.conftest import wait_until

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) to make network namespaces"
    probe = f"h0probe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _enter(ns: str) -> None:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Namespace:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        # Each worker thread enters the namespace once; everything submitted here connects from inside it.
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=name, initializer=_enter,
                                       initargs=(name,))

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.pool.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self.pool.submit(fn, *args)

    def cut_route(self, address: str) -> None:
        """From this namespace, `address` becomes unreachable for new connections (an `unreachable` route: a
        connect fails at once); a connection already open keeps receiving, as when a link half fails."""
        _ip("-n", self.name, "route", "add", "unreachable", f"{address}/32")


class Lab:
    """Namespaces made for one test, all deleted in `close` (their veths go with them)."""

    def __init__(self) -> None:
        self.tag = f"h0{secrets.token_hex(3)}"
        self.subnet = f"10.231.{random.randint(0, 255)}"
        self.hub = f"{self.tag}hub"
        self.spaces: list[Namespace] = []
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add(self) -> Namespace:
        index = len(self.spaces)
        ns = Namespace(f"{self.tag}n{index}", f"{self.subnet}.{index + 2}")
        _ip("netns", "add", ns.name)
        self.spaces.append(ns)
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{index}", "netns", self.hub)
        _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", "eth0")
        _ip("-n", ns.name, "link", "set", "eth0", "up")
        _ip("-n", self.hub, "link", "set", f"p{index}", "master", "br0", "up")
        return ns

    def close(self) -> None:
        for ns in self.spaces:
            ns.pool.shutdown(wait=False, cancel_futures=True)
        for name in [ns.name for ns in self.spaces] + [self.hub]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Node:
    """A real `hal0 serve` inside a namespace, on its address with an API key, and its own HAL0_HOME."""

    PORT = 8080

    def __init__(self, ns: Namespace, home: Path, llama_server: str, key: str) -> None:
        self.ns = ns
        self.home = home
        self.key = key
        self.llama_server = llama_server
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "api.log"
        home.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{self.ns.address}:{self.PORT}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def add_model(self, ref: str, path: Path) -> None:
        ModelStore(self.home / "state" / "models").import_file(ref, path, slot_type="chat", link=True)

    def write_slot(self, name: str, text: str) -> None:
        folder = self.home / "config" / "slots"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.toml").write_text(text)

    def start(self, peers: list[Node] | None = None, env: dict[str, str] | None = None) -> Node:
        environ = {**os.environ, "HAL0_HOME": str(self.home), "HAL0_HOST": self.ns.address,
                   "HAL0_API_KEYS": self.key, "HAL0_LLAMA_SERVER": self.llama_server,
                   "HAL0_SUPERVISOR": "embedded", "HAL0_IDLE_TIMEOUT_S": "600",
                   "HAL0_PEERS": ",".join(f"{p.url}#{p.key}" for p in peers or []), **(env or {})}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns.name, sys.executable, "-m", "hal0.cli", "serve",
                 "--port", str(self.PORT), "--no-demo", "--log-level", "warning"],
                env=environ, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hal0 exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return self.get("/api/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 60, f"hal0 in {self.ns.name} to answer")
        return self

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.ns.call(self._request, "GET", path, kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.ns.call(self._request, "POST", path, kw)

    def _request(self, method: str, path: str, kw: dict[str, Any]) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            return client.request(method, path, headers=headers, **kw)

    def peers(self) -> dict[str, dict[str, Any]]:
        resp = self.get("/api/peers")
        resp.raise_for_status()
        return {p["url"]: p for p in resp.json()["data"]}

    def decisions(self) -> list[dict[str, Any]]:
        resp = self.get("/api/decisions", params={"limit": 2000})
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def kill_backends(self) -> None:
        for pidfile in (self.home / "state" / "slots").glob("*/backend.pid"):
            try:
                os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass

    def close(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        finally:
            self.kill_backends()

