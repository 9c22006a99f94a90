"""A Debian root booted with systemd-nspawn, for the real-systemd tests: the cached root, the gate, the boot.

The root is bootstrapped once per package list (cached like the llama-server wheel) and copied per test module.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.conftest import wait_until

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SUITE = "bookworm"
#: What the booted root needs: systemd as PID 1, python3 with venv for hal0, libgomp1 for llama-server.
PACKAGES = ("dbus", "libgomp1", "python3", "python3-venv", "systemd", "systemd-sysv")
CACHE = Path(os.environ.get("HAL0_TEST_SYSTEMD_CACHE", Path.home() / ".cache/hal0")).expanduser()


def root_key() -> str:
    """Changes whenever the suite or the package list does, so a new list bootstraps a new root."""
    return hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]


def cached_root() -> Path:
    return CACHE / f"systemd-{SUITE}-{root_key()}"


def unavailable() -> str | None:
    """Why this machine cannot boot a container, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and debootstrap)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install systemd-container debootstrap)"
    return None


def require() -> None:
    """Skip with the reason on a machine that cannot boot a container; CI never skips, it fails."""
    reason = unavailable()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"real-systemd tests cannot run in CI: {reason}; run.sh test must install them")
    pytest.skip(f"real-systemd tests: {reason}")


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt already uses for `suite` (deb822 or one-line sources)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for stanza in "\n\n".join(texts).split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
        if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
            return str(fields["URIs"].split()[0])
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    raise RuntimeError(f"no apt source for Debian {suite} in /etc/apt: cannot debootstrap")


def ensure_root() -> Path:
    """The cached, bootstrapped root (built once: about a minute from a nearby mirror)."""
    root = cached_root()
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                           str(tmp), apt_mirror()], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    tmp.rename(root)
    return root


def copy_root(dest: Path) -> Path:
    """A private copy of the cached root, so a test's state never leaks into the cache."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(ensure_root()), str(dest)], check=True, timeout=600)
    return dest


def boot_or_skip(box: Container) -> None:
    """Boot `box`; a machine whose kernel or sandbox will not run nspawn skips with the log, CI fails."""
    try:
        box.boot()
    except (RuntimeError, AssertionError) as exc:
        box.stop()
        if IN_CI:
            raise
        pytest.skip(f"real-systemd tests: this machine cannot boot a container: {exc}")


class Container:
    """One boot of `root` under systemd-nspawn; `run` executes a command inside it through nsenter."""

    def __init__(self, root: Path, log: Path, machine: str = "hal0test") -> None:
        self.root = root
        self._log = log
        self._machine = machine
        self._proc: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []

    def boot(self) -> None:
        with self._log.open("ab") as log:
            # No machined or host systemd here: --register=no --keep-unit avoid needing the host's system bus.
            self._proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit",
                 f"--machine={self._machine}", "--console=passive"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proc = self._proc

        def init_pid() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {proc.returncode}: {self._log.read_text()[-2000:]}")
            try:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            except FileNotFoundError:
                return None  # nspawn itself just exited: the next poll says how
            for kid in kids:
                # nspawn forks short-lived helpers before the container's init: one can exit between the listing
                # and this read (seen once in CI), which is "not systemd", not a failure.
                try:
                    comm = Path(f"/proc/{kid}/comm").read_text().strip()
                except FileNotFoundError:
                    continue
                if comm == "systemd":
                    return int(kid)
            return None

        pid = wait_until(init_pid, 60, "the container's systemd")
        self.prefix = ["nsenter", "-t", str(pid), "-a"]

        def booted() -> str:
            # Empty until PID 1 listens on its socket, and "offline" for a moment while it is still coming up (seen
            # once in CI); then --wait returns once start-up has finished.
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=120).stdout.strip()
            return "" if state in ("", "offline", "initializing", "starting") else state

        state = wait_until(booted, 120, "the container to boot")
        assert state in ("running", "degraded"), state

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        setenv = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
        proc = subprocess.run([*self.prefix, *setenv, *argv], capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self) -> None:
        """A clean shutdown: nspawn forwards SIGTERM as a poweroff request to the container's systemd."""
        proc = self._proc
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None
        self.prefix = []
