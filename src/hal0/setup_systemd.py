"""`hal0 setup --systemd` and `hal0 doctor`: render and install hal0's systemd units, and check the host.

Rendering is pure (settings in, unit text out); installing writes under a root so it can target a container.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

from hal0.datatypes import datatype
from hal0.errors import ConfigError, Hal0Error
from hal0.fsio import atomic_write_text
from hal0.providers.llamacpp import build_kind_of, find_llama_server
from hal0.settings import Settings
from hal0.supervisors.choose import TEMPLATE_UNIT, choose_supervisor
from hal0.supervisors.systemd import UNIT_DIR

API_UNIT = "hal0-api.service"
#: The API's listening socket, held by systemd across the API's restarts and passed to it (socket activation).
API_SOCKET = "hal0-api.socket"
UNITS = (TEMPLATE_UNIT, API_UNIT, API_SOCKET)
USER = "hal0"
#: Groups that grant GPU access on common distributions; the backend user joins those that exist.
GPU_GROUPS = ("video", "render")
#: Below this much free space on the state dir, doctor warns (a small chat model alone is a few GiB).
MIN_FREE_BYTES = 5 * 1024**3
# Characters a path may use inside a unit file without quoting (no spaces, quotes, `%` or `$`).
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+@:/-]*")


def _unit_path(value: Path | str, what: str) -> str:
    text = str(value)
    if not _SAFE_PATH.fullmatch(text):
        raise ConfigError(f"{what} {text!r} cannot go into a systemd unit: use an absolute path without "
                          "spaces, quotes, % or $")
    return text


def listen_address(host: str, port: int) -> str:
    """`host:port` as a socket unit's `ListenStream=` takes it: an IP address (`localhost` is 127.0.0.1; systemd
    resolves no names), an IPv6 one in brackets."""
    import ipaddress

    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host.strip("[]"))
    except ValueError:
        raise ConfigError(f"host {host!r} cannot go into hal0-api.socket: systemd listens on an IP address, "
                          "not a name; set host to one (127.0.0.1, ::1, 0.0.0.0)") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def hal0_executable() -> Path:
    """The `hal0` console script of this installation (beside the running Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "hal0"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("hal0")
    if found is None:
        raise ConfigError("cannot find the hal0 command to put into hal0-api.service",
                          detail={"searched": [str(beside), "PATH"]})
    return Path(found).absolute()


def render_unit(name: str, settings: Settings, *, hal0: Path | None = None, unit_dir: Path = UNIT_DIR,
                user: str = USER) -> str:
    """The text of unit `name` (one of UNITS) for these settings."""
    if name not in UNITS:
        raise ValueError(f"unknown hal0 unit {name!r}")
    template = resources.files("hal0.supervisors").joinpath("units", name).read_text()
    values = {
        "USER": user,
        "STATE_DIR": _unit_path(settings.state_dir, "state_dir"),
        "LOG_DIR": _unit_path(settings.log_dir, "log_dir"),
        "CONFIG_DIR": _unit_path(settings.config_dir, "config_dir"),
        "UNIT_DIR": _unit_path(unit_dir, "unit directory"),
        "HOST": settings.host,
        "PORT": str(settings.port),
        "LISTEN": listen_address(settings.host, settings.port),
    }
    if name == API_UNIT:
        values["HAL0"] = _unit_path(hal0 or hal0_executable(), "hal0 executable")
    text = template
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    leftover = re.search(r"@@[A-Z_]+@@", text)
    if leftover:
        raise ValueError(f"{name}: placeholder {leftover.group()} has no value")
    return text


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _user_exists(root: Path, user: str) -> bool:
    try:
        passwd = (root / "etc/passwd").read_text()
    except OSError:
        return False
    return any(line.split(":", 1)[0] == user for line in passwd.splitlines())


def _groups(root: Path) -> set[str]:
    try:
        text = (root / "etc/group").read_text()
    except OSError:
        return set()
    return {line.split(":", 1)[0] for line in text.splitlines() if line}


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Hal0Error(f"`{' '.join(argv)}` failed: {exc}", code="setup_failed") from exc
    if proc.returncode != 0:
        raise Hal0Error(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}",
                        code="setup_failed", detail={"argv": argv, "returncode": proc.returncode})


def install_units(settings: Settings, *, root: Path = Path("/"), dry_run: bool = False,
                  unit_dir: Path = UNIT_DIR, hal0: Path | None = None, user: str = USER) -> list[Path]:
    """Install hal0's units under `root` and enable the API's socket and service; returns the unit files written.

    Creates the `hal0` system user if missing (in the GPU groups that exist), the state/log/config dirs, writes
    the units, then `systemctl daemon-reload` and `systemctl enable hal0-api.socket hal0-api.service` (offline,
    with `--root`, when `root` is not `/`). With `dry_run` nothing is changed and the paths are only listed.
    """
    rendered = {name: render_unit(name, settings, hal0=hal0, unit_dir=unit_dir, user=user) for name in UNITS}
    paths = [_under(root, unit_dir) / name for name in UNITS]
    if dry_run:
        return paths
    prefix = [] if root == Path("/") else ["--root", str(root)]
    if not _user_exists(root, user):
        groups = sorted(_groups(root) & set(GPU_GROUPS))
        _run(["useradd", *prefix, "--system", "--user-group", "--no-create-home",
              "--home-dir", str(settings.state_dir), "--shell", "/usr/sbin/nologin",
              "--comment", "hal0 inference backends", *(["--groups", ",".join(groups)] if groups else []),
              user])
    for d in (settings.state_dir, settings.slots_state_dir, settings.models_dir, settings.log_dir,
              settings.config_dir):
        _under(root, d).mkdir(parents=True, exist_ok=True)
    for name, path in zip(UNITS, paths, strict=True):
        atomic_write_text(path, rendered[name], mode=0o644)
    if root == Path("/"):
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", API_SOCKET, API_UNIT])
    else:
        _run(["systemctl", "--root", str(root), "enable", API_SOCKET, API_UNIT])
    return paths


# -- doctor ------------------------------------------------------------------------------------------------
@datatype(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def doctor_checks(settings: Settings, api_url: str | None = None) -> list[Check]:
    """Everything `hal0 doctor` reports, each with a verdict and a human detail; `api_url` is the API to ask
    (the settings' own address by default)."""
    return [_check_supervisor(settings), _check_llama_server(settings), _check_ports(settings),
            _check_state_dir(settings), _check_disk(settings), _check_hardware(),
            _check_api(settings, api_url or settings.base_url)]


def _check_api(settings: Settings, url: str) -> Check:
    """The running API's own account of its writes (`/api/health`): state and decision writes that failed, and
    whether they still fail (a full disk). An API that is not running is no failure: there is nothing to ask."""
    import httpx

    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/health", headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        return Check("api", True, f"not running at {url} ({type(exc).__name__}): no writes to report")
    if resp.status_code != 200:
        return Check("api", False, f"{url}/api/health answered HTTP {resp.status_code}")
    try:
        failures = dict(resp.json().get("write_failures") or {})
    except (ValueError, AttributeError, TypeError):
        return Check("api", False, f"{url}/api/health did not answer with its JSON")
    failing: dict[str, str] = dict(failures.pop("failing", None) or {})
    counts = {channel: int(n) for channel, n in failures.items() if isinstance(n, int) and n}
    if failing:
        now = "; ".join(f"{channel} ({counts.get(channel, 0)} failed so far): {message}"
                        for channel, message in sorted(failing.items()))
        return Check("api", False, f"up at {url}; writes failing now: {now}")
    if counts:
        earlier = ", ".join(f"{n} {channel}" for channel, n in sorted(counts.items()))
        return Check("api", True, f"up at {url}; writes failed earlier ({earlier}) and work again")
    return Check("api", True, f"up at {url}; no failed writes")


def _check_hardware() -> Check:
    from hal0.hardware.inventory import read_inventory

    inv = read_inventory()
    gib = 1 << 30
    parts = [f"{inv.cpu_cores} cores, host {inv.memory.available_bytes / gib:.1f} of "
             f"{inv.memory.total_bytes / gib:.1f} GiB free ({inv.memory.source})"]
    parts += [f"gpu{g.index} {g.name} {g.memory_total_bytes / gib:.1f} GiB"
              + (f" + GTT {g.gtt_total_bytes / gib:.1f} GiB" if g.gtt_total_bytes else "") for g in inv.gpus]
    parts += [f"npu {n}" for n in inv.npus]
    parts += [f"{k}: {v}" for k, v in inv.skipped.items()]
    return Check("hardware", True, "; ".join(parts))


def _check_supervisor(settings: Settings) -> Check:
    supervisor, reason = choose_supervisor(settings)
    return Check("supervisor", True, f"{supervisor.kind}: {reason}")


def _check_llama_server(settings: Settings) -> Check:
    try:
        path = find_llama_server(settings.llama_server)
    except Hal0Error as exc:
        return Check("llama-server", False, exc.message)
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("llama-server", False, f"{path} does not run: {exc}")
    # llama-server prints "version: N (commit)" and its build line on stderr.
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    version = next((ln for ln in lines if ln.startswith("version:")), lines[0] if lines else "no output")
    if proc.returncode != 0:
        return Check("llama-server", False, f"{path} --version exited with {proc.returncode}: {version}")
    return Check("llama-server", True, f"{path} ({version}; {build_kind_of(path)} build; devices: "
                                       f"{', '.join(_llama_devices(path)) or 'none (CPU only)'})")


def _llama_devices(path: Path) -> list[str]:
    """The devices this build of llama-server sees (`--list-devices`), e.g. `CUDA0: NVIDIA H200 (143 GiB)`."""
    try:
        proc = subprocess.run([str(path), "--list-devices"], capture_output=True, text=True, timeout=30,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = (proc.stdout + proc.stderr).splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("Available devices")), len(lines))
    return [ln.strip() for ln in lines[start + 1:] if ln.strip() and ln.strip() != "(none)"]


def _slot_ports(settings: Settings) -> dict[int, str]:
    """Ports recorded in the slots' state files (read only: doctor never moves a corrupt file aside)."""
    owners: dict[int, str] = {}
    for state in sorted(settings.slots_state_dir.glob("*/state.json")):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        port = data.get("port") if isinstance(data, dict) else None
        if isinstance(port, int) and data.get("state") not in (None, "offline"):
            owners[port] = str(data.get("name") or state.parent.name)
    return owners


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_ports(settings: Settings) -> Check:
    owners = _slot_ports(settings)
    ours: list[str] = []
    foreign: list[int] = []
    for port in range(settings.port_min, settings.port_max + 1):
        if _port_free("127.0.0.1", port):
            continue
        if port in owners:
            ours.append(f"{port} (slot {owners[port]})")
        else:
            foreign.append(port)
    span = f"{settings.port_min}-{settings.port_max}"
    if foreign:
        return Check("ports", False, f"slot ports {span}: in use by something other than hal0: "
                     f"{', '.join(map(str, foreign))}" + (f"; hal0's: {', '.join(ours)}" if ours else ""))
    if ours:
        return Check("ports", True, f"slot ports {span}: free, except hal0's {', '.join(ours)}")
    return Check("ports", True, f"slot ports {span}: all free")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_state_dir(settings: Settings) -> Check:
    target = settings.state_dir
    base = _existing(target)
    probe = base / f".hal0-doctor-{id(settings)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        where = str(target) if base == target else f"{base} (to create {target})"
        return Check("state dir", False, f"{where} is not writable: {exc.strerror or exc}")
    note = "" if base == target else f" ({target} will be created under {base})"
    return Check("state dir", True, f"{target} is writable{note}")


def _check_disk(settings: Settings) -> Check:
    base = _existing(settings.state_dir)
    usage = shutil.disk_usage(base)
    free = f"{usage.free / 1024**3:.1f} GiB free of {usage.total / 1024**3:.1f} GiB on {base}"
    if usage.free < MIN_FREE_BYTES:
        return Check("disk", False, f"only {free}; models need several GiB each")
    return Check("disk", True, free)
