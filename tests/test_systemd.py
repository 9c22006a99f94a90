"""The systemd supervisor: rendered units that systemd itself accepts, the supervisor chooser, doctor checks,
and a real systemd booted in a container (tests/nspawn.py) driving a slot unit with a stand-in backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hal0.errors import ConfigError
from hal0.providers.base import Command
from hal0.settings import Settings, load_settings
from hal0.setup_systemd import API_SOCKET, API_UNIT, doctor_checks, install_units, listen_address, render_unit
from hal0.supervisors.base import Handle, ProcessStatus
from hal0.supervisors.choose import TEMPLATE_UNIT, choose_supervisor
from hal0.supervisors.systemd import (
    SystemdSupervisor,
    dropin_path,
    quote_exec_argv,
    render_dropin,
    unit_name,
)
from tests import nspawn
from tests.conftest import alive, free_port, wait_until

IN_CI = bool(os.environ.get("CI"))
TRICKY_ARGV = ("a b", 'q"x', "100%", "$HOME", "${HOME}", "back\\slash", ";", "it's", "tab\there", "")


def _settings(tmp_path: Path, **changes: object) -> Settings:
    return replace(load_settings(env={"HAL0_HOME": str(tmp_path / "home")}), **changes)  # type: ignore[arg-type]


def _hal0_bin() -> Path:
    return Path(shutil.which("true") or "/bin/true")


@pytest.fixture
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing in CI: run.sh must install Debian's `systemd` package")
        pytest.skip("systemd-analyze not installed (apt-get install systemd); unit files not verified")
    return found


def _verify(analyze: str, unit_dir: Path, unit: str) -> None:
    """systemd's own parser over a unit (with its drop-ins): no error, and not one warning about our files."""
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit_dir / unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "hal0" in ln]
    assert proc.returncode == 0, proc.stderr
    assert ours == [], "\n".join(ours)


def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, analyze: str) -> None:
    settings = _settings(tmp_path)
    unit_dir = tmp_path / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in (TEMPLATE_UNIT, API_UNIT, API_SOCKET):
        (unit_dir / name).write_text(render_unit(name, settings, hal0=_hal0_bin(), unit_dir=unit_dir))
    dropin = dropin_path(unit_dir, "primary")
    dropin.parent.mkdir(parents=True)
    dropin.write_text(render_dropin("primary", Command((_hal0_bin().as_posix(), *TRICKY_ARGV),
                                                       {"LLAMA_ARG_X": "1 2", "ODD": 'x%y$z"\\'}),
                                    stop_timeout_s=7))

    _verify(analyze, unit_dir, API_UNIT)
    _verify(analyze, unit_dir, API_SOCKET)
    _verify(analyze, unit_dir, TEMPLATE_UNIT)
    _verify(analyze, unit_dir, unit_name("primary"))


def test_a_broken_dropin_is_caught_by_verify(tmp_path: Path, analyze: str) -> None:
    """Guards the verification itself: it must really read the slot's drop-in."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / TEMPLATE_UNIT).write_text(render_unit(TEMPLATE_UNIT, _settings(tmp_path)))
    dropin = dropin_path(unit_dir, "embed")
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nNoSuchSetting=1\n")
    with pytest.raises(AssertionError, match="NoSuchSetting"):
        _verify(analyze, unit_dir, unit_name("embed"))


def test_exec_start_quotes_every_word_for_systemd() -> None:
    line = quote_exec_argv(("/opt/llama-server", *TRICKY_ARGV))
    assert line == ('"/opt/llama-server" "a b" "q\\"x" "100%%" "$$HOME" "$${HOME}" "back\\\\slash" ";" '
                    '"it\'s" "tab\\there" ""')


def test_dropin_replaces_the_command_and_sets_the_environment() -> None:
    text = render_dropin("stt", Command(("/usr/bin/srv", "--port", "8082"), {"B": "2", "A": "1%"}),
                         stop_timeout_s=12.4)
    lines = text.splitlines()
    assert lines[1:] == ["[Service]", "ExecStart=", 'ExecStart="/usr/bin/srv" "--port" "8082"',
                         "TimeoutStopSec=12s", 'Environment="A=1%%"', 'Environment="B=2"']


def test_slot_units_are_independent_of_the_api_unit(tmp_path: Path) -> None:
    slot = render_unit(TEMPLATE_UNIT, _settings(tmp_path))
    for binding in ("PartOf=", "BindsTo=", "Requires=", "Requisite="):
        assert binding not in slot
    assert "hal0-api" not in slot.split("[Unit]", 1)[1]
    api = render_unit(API_UNIT, _settings(tmp_path), hal0=_hal0_bin())
    assert "hal0-slot" not in api.split("[Unit]", 1)[1]


def test_units_carry_restart_policy_user_and_sandbox(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    slot = render_unit(TEMPLATE_UNIT, settings)
    for line in ("User=hal0", "Restart=on-failure", "KillMode=mixed", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", f"ReadWritePaths=-{settings.state_dir} -{settings.log_dir}",
                 "PrivateTmp=yes", "ProtectHome=read-only"):
        assert line in slot.splitlines()
    assert any(ln.startswith("StartLimitBurst=") for ln in slot.splitlines())
    api = render_unit(API_UNIT, settings, hal0=Path("/opt/hal0/bin/hal0"))
    for line in ("ExecStart=/opt/hal0/bin/hal0 serve", "WantedBy=multi-user.target", "Restart=on-failure",
                 # Restarted at once: its socket keeps clients waiting meanwhile, and a crash loop hits the limit.
                 "RestartSec=0", "Requires=hal0-api.socket", "After=network.target hal0-api.socket",
                 "Also=hal0-api.socket"):
        assert line in api.splitlines()
    assert any(ln.startswith("StartLimitBurst=") for ln in api.splitlines())
    sock = render_unit(API_SOCKET, replace(settings, port=8123))
    assert "ListenStream=127.0.0.1:8123" in sock.splitlines()
    assert "WantedBy=sockets.target" in sock.splitlines()


def test_the_socket_unit_listens_on_an_ip_address() -> None:
    assert listen_address("127.0.0.1", 8080) == "127.0.0.1:8080"
    assert listen_address("localhost", 8080) == "127.0.0.1:8080"  # systemd resolves no names
    assert listen_address("::1", 8080) == "[::1]:8080"
    assert listen_address("[::]", 9000) == "[::]:9000"
    assert listen_address("0.0.0.0", 80) == "0.0.0.0:80"
    for name in ("hal0.example", "127.0.0.1\n", ""):
        with pytest.raises(ConfigError, match="systemd listens on an IP address"):
            listen_address(name, 8080)


def test_paths_a_unit_cannot_hold_are_refused(tmp_path: Path) -> None:
    settings = replace(_settings(tmp_path), state_dir=Path("/var/lib/my hal0"))
    with pytest.raises(ConfigError, match="state_dir"):
        render_unit(TEMPLATE_UNIT, settings)


def test_install_dry_run_lists_the_units_and_changes_nothing(tmp_path: Path) -> None:
    paths = install_units(_settings(tmp_path), root=tmp_path / "root", dry_run=True, hal0=_hal0_bin())
    assert paths == [tmp_path / "root/etc/systemd/system" / name for name in (TEMPLATE_UNIT, API_UNIT, API_SOCKET)]
    assert not (tmp_path / "root").exists()


# -- choosing ---------------------------------------------------------------------------------------------
def test_chooser_picks_embedded_on_this_machine_with_a_reason(tmp_path: Path) -> None:
    supervisor, reason = choose_supervisor(_settings(tmp_path))
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd as PID 1")
    assert supervisor.kind == "embedded"
    assert reason.startswith("auto: systemd is not the init system")


def test_chooser_wants_systemd_running_and_the_template_installed(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    supervisor, reason = choose_supervisor(settings, root=root)
    assert (supervisor.kind, "not installed" in reason) == ("embedded", True)
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd/system" / TEMPLATE_UNIT).write_text("")
    supervisor, reason = choose_supervisor(settings, root=root)
    assert supervisor.kind == "systemd"
    assert "is installed" in reason


def test_settings_force_either_supervisor(tmp_path: Path) -> None:
    forced, reason = choose_supervisor(_settings(tmp_path, supervisor="systemd"), root=tmp_path)
    assert forced.kind == "systemd"
    assert "supervisor = systemd in settings" in reason and "not seem to be running" in reason
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / TEMPLATE_UNIT).write_text("")
    embedded, reason = choose_supervisor(_settings(tmp_path, supervisor="embedded"), root=root)
    assert (embedded.kind, reason) == ("embedded", "supervisor = embedded in settings")


# -- doctor -----------------------------------------------------------------------------------------------
def _free_port_pair() -> tuple[int, int]:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port, port + 1
    raise RuntimeError("no two free ports")


def _nobody_listens() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_doctor_reports_each_check_and_a_foreign_port(tmp_path: Path) -> None:
    lo, hi = _free_port_pair()
    settings = _settings(tmp_path, port_min=lo, port_max=hi, port=_nobody_listens())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", hi))
        squatter.listen()
        checks = {c.name: c for c in doctor_checks(settings)}
    assert list(checks) == ["supervisor", "llama-server", "ports", "state dir", "disk", "hardware", "api"]
    assert checks["api"].ok and checks["api"].detail.startswith("not running at"), checks["api"]
    assert checks["supervisor"].detail.startswith(("embedded: ", "systemd: "))
    assert not checks["ports"].ok and str(hi) in checks["ports"].detail
    assert checks["state dir"].ok, checks["state dir"].detail


def test_doctor_names_hal0s_own_ports(tmp_path: Path) -> None:
    lo, hi = _free_port_pair()
    settings = _settings(tmp_path, port_min=lo, port_max=hi, port=_nobody_listens())
    state = settings.slots_state_dir / "primary" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"name": "primary", "state": "ready", "port": lo}))
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", lo))
        backend.listen()
        ports = next(c for c in doctor_checks(settings) if c.name == "ports")
    assert ports.ok and f"{lo} (slot primary)" in ports.detail


# -- a real systemd ------------------------------------------------------------------------------------
BACKEND = """
import json, os, sys, time
out = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ("ODD", "SPACED")}, "user": os.getuid()}
with open("/var/lib/hal0/dump-" + os.environ["SLOT"] + ".json", "w") as fh:
    json.dump(out, fh)
print("backend says: hello from", os.environ["SLOT"], flush=True)
if os.environ.get("FAIL"):
    print("backend says: model file is corrupt", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(3600)
"""
@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """A private copy of the cached Debian root, booted with systemd as its PID 1; yields (root, prefix into it)."""
    nspawn.require()
    tmp = tmp_path_factory.mktemp("systemd")
    box = nspawn.Container(nspawn.copy_root(tmp / "root"), tmp / "nspawn.log")
    nspawn.boot_or_skip(box)
    try:
        yield box.root, box.prefix
    finally:
        box.stop()


@pytest.fixture(scope="module")
def installed(container: tuple[Path, list[str]]) -> Iterator[tuple[SystemdSupervisor, Path, list[str]]]:
    root, prefix = container
    # The container shares this machine's network: its hal0-api.socket listens on a free port, not on 8080.
    settings = Settings(config_dir=Path("/etc/hal0"), state_dir=Path("/var/lib/hal0"),
                        log_dir=Path("/var/log/hal0"), port=free_port())
    install_units(settings, root=root, hal0=Path("/usr/bin/true"))
    (root / "var/lib/hal0").chmod(0o777)  # the backend user dumps its argv there
    subprocess.run([*prefix, "systemctl", "daemon-reload"], check=True, timeout=60)
    supervisor = SystemdSupervisor(root / "etc/systemd/system", stop_timeout_s=5,
                                   systemctl=[*prefix, "systemctl"], journalctl=[*prefix, "journalctl"])
    # The root is this module's private copy: nothing to clean up.
    yield supervisor, root, prefix


def _command(slot: str, **env: str) -> Command:
    return Command(("/usr/bin/python3", "-c", BACKEND, *TRICKY_ARGV),
                   {"SLOT": slot, "ODD": 'x%y$z"\\', "SPACED": "a b", **env})


@pytest.mark.slow
async def test_real_systemd_runs_a_slot_with_its_exact_argv(
        installed: tuple[SystemdSupervisor, Path, list[str]]) -> None:
    supervisor, root, prefix = installed
    dump = root / "var/lib/hal0/dump-real.json"
    dump.unlink(missing_ok=True)
    handle = await supervisor.start("real", _command("real"))
    assert handle.unit == "hal0-slot@real.service" and handle.pid
    assert (await supervisor.status("real", handle)).alive
    data = json.loads(wait_until(lambda: dump.read_text() if dump.is_file() else None, 30, "the backend's dump"))
    assert data["argv"] == list(TRICKY_ARGV)
    assert data["env"] == {"ODD": 'x%y$z"\\', "SPACED": "a b"}
    assert data["user"] != 0
    for _ in range(300):
        if "backend says: hello from real" in await supervisor.log_tail("real"):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the backend's line never reached the journal")

    # A fresh supervisor (as after an API restart) adopts the running unit.
    fresh = SystemdSupervisor(root / "etc/systemd/system", systemctl=[*prefix, "systemctl"],
                              journalctl=[*prefix, "journalctl"])
    adopted = await fresh.adopt("real", handle)
    assert adopted.alive and adopted.pid == handle.pid

    # The API unit (here a stand-in command) restarting or stopping never takes a slot down with it.
    for verb in ("restart", "stop"):
        await asyncio.to_thread(subprocess.run, [*prefix, "systemctl", verb, API_UNIT], check=True, timeout=60)
    assert (await supervisor.status("real", handle)).alive

    stopped = await supervisor.stop("real", handle, timeout=5)
    assert not stopped.alive
    assert not (await supervisor.status("real", handle)).alive


@pytest.mark.slow
async def test_real_systemd_reloads_its_units_only_for_a_command_it_has_not_loaded(
        installed: tuple[SystemdSupervisor, Path, list[str]]) -> None:
    """A daemon-reload re-reads every unit on the machine (~150 ms in the container): a slot loaded again with the
    same command starts without one, one with another command gets it, and so does a drop-in that changed behind
    systemd's back (an API stopped between writing it and reloading)."""
    supervisor, root, prefix = installed
    dump = root / "var/lib/hal0/dump-again.json"

    def reloads() -> str:  # the manager's timestamp of its last (re)load of the units
        return subprocess.run([*prefix, "systemctl", "show", "--property=UnitsLoadTimestampMonotonic"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    async def load(stop: bool = True, **env: str) -> dict[str, Any]:
        dump.unlink(missing_ok=True)
        handle = await supervisor.start("again", _command("again", **env))
        data: dict[str, Any] = json.loads(wait_until(lambda: dump.read_text() if dump.is_file() else None, 30,
                                                     "the backend's dump"))
        if stop:
            assert not (await supervisor.stop("again", handle, timeout=5)).alive
        return data

    await load()
    before = reloads()
    for _ in range(3):  # more loads than the template's StartLimitBurst: each start resets the unit's count
        assert (await load())["env"]["ODD"] == 'x%y$z"\\'
    assert reloads() == before, "the same command again: no daemon-reload"
    assert (await load(ODD="another"))["env"]["ODD"] == "another"
    after = reloads()
    assert after != before, "another command: reloaded"
    # While the unit runs, systemd keeps what it loaded: a drop-in written behind its back is found through its
    # NeedDaemonReload, though the text hal0 writes is the same as the file's.
    await load(stop=False, ODD="running")
    supervisor._write_dropin("again", _command("again", ODD="behind"))
    assert (await load(ODD="behind"))["env"]["ODD"] == "behind"
    assert reloads() != after, "reloaded for the drop-in systemd had not loaded"


@pytest.mark.slow
async def test_real_systemd_log_watch_follows_the_run_that_start_began(
        installed: tuple[SystemdSupervisor, Path, list[str]]) -> None:
    """A warming slot's probe is woken by its backend's lines, which under systemd are in the journal: the watch
    follows the unit's run (its InvocationID) from its first line, and returns on a ready line as it comes."""
    supervisor, _, _ = installed
    script = ("import time; print('loading the model', flush=True); time.sleep(1.5); "
              "print('main: model loaded', flush=True); time.sleep(3600)")
    handle = await supervisor.start("news", Command(("/usr/bin/python3", "-c", script), {}))
    try:
        async with supervisor.log_watch("news", handle) as news:
            started = time.monotonic()
            await news.grown(0, 60, (b"model loaded",))
            assert time.monotonic() - started < 30, "returned on the line, not after the interval"
            assert news.mark() == 2, "both lines of this run, the first from before the watch began"
            # Nothing more comes: a wait for news past the mark lasts its interval.
            before = news.mark()
            await news.grown(before, 0.3)
            assert news.mark() == before
    finally:
        assert not (await supervisor.stop("news", handle, timeout=5)).alive


@pytest.mark.slow
async def test_real_systemd_reports_a_crash_with_exit_code_and_journal(
        installed: tuple[SystemdSupervisor, Path, list[str]]) -> None:
    supervisor, _, _ = installed
    handle = await supervisor.start("broken", _command("broken", FAIL="1"))

    async def crashed() -> ProcessStatus:
        while (status := await supervisor.status("broken", handle)).alive:
            await asyncio.sleep(0.05)
        return status

    status = await asyncio.wait_for(crashed(), 30)
    assert status.exit_code == 3, status
    assert "exited with code 3" in status.detail
    assert any("model file is corrupt" in ln for ln in await supervisor.log_tail("broken"))
    final = await supervisor.stop("broken", Handle(None, handle.unit), timeout=5)
    assert not final.alive


# -- the API's event loop while systemctl is slow ------------------------------------------------------------
# A stand-in systemctl is enough here: the property is about hal0's own process (does its loop wait on a child?),
# not about systemd, which the container tests above drive for real.
SHOW_ACTIVE = "LoadState=loaded\\nActiveState=active\\nSubState=running\\nMainPID=4242\\n"


def _slow_systemctl(tmp_path: Path) -> Path:
    """A `systemctl` that notes its pid in `calls` and answers only once the file `release` exists."""
    shim = tmp_path / "systemctl"
    shim.write_text(f"""#!/bin/sh
echo "$$ $*" >> '{tmp_path}/calls'
while [ ! -e '{tmp_path}/release' ]; do sleep 0.01; done
case "$1" in show) printf '{SHOW_ACTIVE}' ;; esac
""")
    shim.chmod(0o755)
    return shim


def _calls(tmp_path: Path) -> list[tuple[int, str]]:
    path = tmp_path / "calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), argv) for pid, _, argv in (line.partition(" ") for line in lines)]


async def _until(predicate: Any, what: str, timeout: float = 30) -> Any:
    """Poll on the event loop with a deadline; the loop must be free for this to see anything."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := predicate()):
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
    return value


async def test_the_event_loop_runs_on_while_systemctl_has_not_answered(tmp_path: Path) -> None:
    shim = _slow_systemctl(tmp_path)
    supervisor = SystemdSupervisor(tmp_path / "units", systemctl=[str(shim)], journalctl=[str(shim)])
    handle = Handle(4242, unit_name("primary"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        for call in (supervisor.status("primary", handle), supervisor.log_tail("primary", 5),
                     supervisor.start("primary", Command((_hal0_bin().as_posix(), "--port", "1"), {}))):
            (tmp_path / "release").unlink(missing_ok=True)
            seen = len(_calls(tmp_path))
            pending = asyncio.ensure_future(call)
            await _until(lambda: len(_calls(tmp_path)) > seen, "systemctl to be called")  # noqa: B023
            before = ticks
            # systemctl is still waiting, and the loop goes on: other coroutines (requests) run meanwhile.
            await _until(lambda: ticks >= before + 50, "the loop to run while systemctl waits")  # noqa: B023
            assert not pending.done()
            (tmp_path / "release").touch()
            result = await asyncio.wait_for(pending, 30)
            if isinstance(result, ProcessStatus):
                assert result.alive and result.pid == 4242, result
            elif isinstance(result, Handle):
                assert result == Handle(4242, unit_name("primary"))
    finally:
        beat.cancel()
    assert [argv.split()[0] for _, argv in _calls(tmp_path)] == [
        "show", "-u", "daemon-reload", "reset-failed", "restart", "show"]


async def test_start_writes_the_dropin_atomically_readable_by_systemd(tmp_path: Path) -> None:
    shim = _slow_systemctl(tmp_path)
    (tmp_path / "release").touch()
    unit_dir = tmp_path / "units"
    supervisor = SystemdSupervisor(unit_dir, stop_timeout_s=7, systemctl=[str(shim)])
    command = Command((_hal0_bin().as_posix(), *TRICKY_ARGV), {"A": "1%"})
    assert await supervisor.start("primary", command) == Handle(4242, unit_name("primary"))
    dropin = dropin_path(unit_dir, "primary")
    assert dropin.read_text() == render_dropin("primary", command, stop_timeout_s=7)
    assert dropin.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in dropin.parent.iterdir()] == [dropin.name], "no temp file left behind"


async def test_a_systemctl_that_never_answers_is_killed_and_reported(tmp_path: Path) -> None:
    shim = _slow_systemctl(tmp_path)
    supervisor = SystemdSupervisor(tmp_path / "units", systemctl=[str(shim)], timeout_s=0.5)
    status = await supervisor.status("primary", Handle(4242, unit_name("primary")))
    assert not status.alive and "did not answer within 0.5s" in status.detail, status
    [(pid, _)] = _calls(tmp_path)
    assert not alive(pid), "the hung systemctl was killed and reaped"

    # A caller that gives up (a cancelled request) takes its systemctl down with it, too.
    slow = SystemdSupervisor(tmp_path / "units", systemctl=[str(shim)])
    pending = asyncio.ensure_future(slow.stop("primary", Handle(4242, unit_name("primary")), timeout=5))
    await _until(lambda: len(_calls(tmp_path)) == 2, "the second systemctl")
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert not alive(_calls(tmp_path)[1][0])
