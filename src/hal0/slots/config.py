"""Slot configuration: one TOML file per slot in `<config_dir>/slots/`, and the four built-in slots.

Names and fields are validated here, so nothing downstream ever sees a hostile name or argument.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from hal0.datatypes import datatype
from hal0.errors import ConfigError, InvalidRequest
from hal0.fsio import atomic_write_text
from hal0.hardware.placement import validate_device
from hal0.kinds import BUILTIN_ALIASES, BUILTIN_SLOTS, DEFAULT_PROVIDER, MODEL_LESS_TYPES, NETWORK_TYPES, SLOT_TYPES
from hal0.registry.store import validate_ref

_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
_ALIAS = r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}"
_ARG = r"[^\x00-\x1f\x7f]{1,512}"
_ENV_KEY = r"[A-Z_][A-Z0-9_]{0,63}"
_HOST = r"\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Fa-f:.]{2,45}|[A-Za-z0-9][A-Za-z0-9.-]{0,252}"
_ENDPOINT = r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):([0-9]{1,5})"
_UNSPECIFIED = frozenset({"0.0.0.0", "::", "[::]"})


def validate_slot_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise InvalidRequest(
            "slot names are 1-63 characters of lowercase letters, digits, '-' and '_', starting with a "
            f"letter or digit; got {name[:80]!r}" if isinstance(name, str) else "slot name must be a string",
            code="invalid_slot_name",
        )
    return name


@datatype(frozen=True, slots=True)
class SlotConfig:
    """A slot's config (`config/slots/<name>.toml`): what it runs, on which port, how long it stays."""
    name: str
    type: str = "chat"
    provider: str = ""
    model: str | None = None
    #: 0 means "allocate from the slot port range".
    port: int = 0
    aliases: tuple[str, ...] = ()
    ctx_size: int | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    idle_timeout_s: float | None = None
    #: Unload after this long idle; None keeps the model loaded.
    ttl_s: float | None = None
    warmup_budget_s: float | None = None
    #: Where the backend runs: "auto" (the GPU with the most free budget that fits, else the CPU), "cpu", "gpu"
    #: (every GPU, as llama.cpp splits), "gpu:N" or "gpu:N,M".
    device: str = "auto"
    #: Layers offloaded on a GPU placement; None: all of them.
    gpu_layers: int | None = None
    #: Never unloaded to make room or under memory pressure.
    pinned: bool = False
    #: Slots of one exclusive group are never loaded together: loading one unloads the others.
    group: str | None = None
    #: The address an rpc worker listens on (other slot types always listen on 127.0.0.1).
    host: str | None = None
    #: Let an rpc worker listen on every interface (0.0.0.0 / ::): it has no authentication.
    insecure_bind: bool = False
    #: llama.cpp RPC workers (`host:port`) a llama-server slot spreads its model over (`--rpc`).
    rpc: tuple[str, ...] = ()
    builtin: bool = False

    def __post_init__(self) -> None:
        validate_slot_name(self.name)
        if self.type not in SLOT_TYPES:
            raise InvalidRequest(f"slot type must be one of {', '.join(SLOT_TYPES)}; got {self.type!r}",
                                 code="invalid_slot_type")
        if not self.provider:
            object.__setattr__(self, "provider", DEFAULT_PROVIDER[self.type])
        if self.model is not None:
            validate_ref(self.model)
        if self.port and not (1024 <= self.port < 65536):
            raise InvalidRequest(f"port must be 1024-65535; got {self.port}", code="invalid_port")
        for alias in self.aliases:
            if not isinstance(alias, str) or not re.fullmatch(_ALIAS, alias):
                raise InvalidRequest(f"invalid alias {str(alias)[:80]!r}", code="invalid_alias")
        for arg in self.args:
            if not isinstance(arg, str) or not re.fullmatch(_ARG, arg):
                raise InvalidRequest(f"invalid backend argument {str(arg)[:80]!r}", code="invalid_arg")
        for key, value in self.env.items():
            if not re.fullmatch(_ENV_KEY, key) or not isinstance(value, str) or "\x00" in value:
                raise InvalidRequest(f"invalid environment entry {key[:64]!r}", code="invalid_env")
        validate_device(self.device)
        if self.gpu_layers is not None and (isinstance(self.gpu_layers, bool) or not isinstance(self.gpu_layers, int)
                                            or self.gpu_layers < 0):
            raise InvalidRequest(f"gpu_layers must be a whole number of layers, 0 or more; got {self.gpu_layers!r}",
                                 code="invalid_value")
        if not isinstance(self.pinned, bool):
            raise InvalidRequest(f"pinned must be true or false; got {self.pinned!r}", code="invalid_value")
        if self.group is not None and (not isinstance(self.group, str) or not re.fullmatch(_NAME, self.group)):
            raise InvalidRequest("group names are 1-63 characters of lowercase letters, digits, '-' and '_'; "
                                 f"got {str(self.group)[:80]!r}", code="invalid_value")
        self._check_network()
        for name in ("ctx_size", "idle_timeout_s", "ttl_s", "warmup_budget_s"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise InvalidRequest(f"{name} must be a positive number; got {value!r}", code="invalid_value")

    def _check_network(self) -> None:
        if self.type in MODEL_LESS_TYPES and self.model is not None:
            raise InvalidRequest(f"{self.type} slots load no model (the main llama-server sends the tensors); "
                                 "drop `model`", code="invalid_field")
        if self.host is not None:
            if self.type not in NETWORK_TYPES:
                raise InvalidRequest(f"only {' and '.join(sorted(NETWORK_TYPES))} slots take `host`; a {self.type} "
                                     "slot listens on 127.0.0.1 behind hal0's API", code="invalid_field")
            if not isinstance(self.host, str) or not re.fullmatch(_HOST, self.host):
                raise InvalidRequest(f"invalid host {str(self.host)[:80]!r}", code="invalid_host")
            if self.host in _UNSPECIFIED and self.insecure_bind is not True:
                raise InvalidRequest(
                    f"slot {self.name} would listen on every interface ({self.host}), and an rpc worker has no "
                    "authentication: name one address, or set `insecure_bind = true` if you really mean it",
                    code="insecure_bind")
        if not isinstance(self.insecure_bind, bool):
            raise InvalidRequest("insecure_bind must be true or false", code="invalid_field")
        if self.rpc:
            if self.provider != "llama.cpp":
                raise InvalidRequest(f"`rpc` workers need a llama.cpp slot, not {self.provider}",
                                     code="invalid_field")
            for endpoint in self.rpc:
                match = re.fullmatch(_ENDPOINT, endpoint) if isinstance(endpoint, str) else None
                if match is None or not 0 < int(match.group(2)) < 65536:
                    raise InvalidRequest(f"rpc worker {str(endpoint)[:80]!r} must be host:port",
                                         code="invalid_rpc")

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict (25 us, a deep copy): every state change of a slot (two for
        # each request) puts this in the event it publishes.
        out = {name: getattr(self, name) for name in _FIELDS}
        out["aliases"] = list(self.aliases)
        out["args"] = list(self.args)
        out["rpc"] = list(self.rpc)
        out["env"] = dict(self.env)
        return out

    def to_toml(self) -> str:
        defaults = {"device": "auto", "pinned": False, "insecure_bind": False, "rpc": ()}
        data = {k: v for k, v in self.to_dict().items()
                if v is not None and k != "builtin" and not (k in defaults and v in (defaults[k], []))}
        import tomli_w  # here: only a change of config writes one, and a start has none to write (~1 ms)

        return tomli_w.dumps(data)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, builtin: bool = False) -> SlotConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequest(f"unknown slot field(s): {', '.join(sorted(unknown))}", code="invalid_field")
        values = dict(data)
        for key in ("aliases", "args", "rpc"):
            if key in values:
                if not isinstance(values[key], list | tuple):
                    raise InvalidRequest(f"{key} must be a list of strings", code="invalid_field")
                values[key] = tuple(values[key])
        if "env" in values and not isinstance(values["env"], dict):
            raise InvalidRequest("env must be a table of strings", code="invalid_field")
        if "port" in values and not isinstance(values["port"], int):
            raise InvalidRequest("port must be an integer", code="invalid_port")
        values["builtin"] = builtin
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidRequest(str(exc), code="invalid_field") from exc


_FIELDS = tuple(f.name for f in fields(SlotConfig))


class ConfigStore:
    """The slot TOML files. Built-in slots exist even without a file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / f"{validate_slot_name(name)}.toml"

    def load_all(self) -> dict[str, SlotConfig]:
        configs = {name: SlotConfig(name=name, type=typ, builtin=True, aliases=BUILTIN_ALIASES.get(name, ()))
                   for name, typ in BUILTIN_SLOTS.items()}
        if self.root.is_dir():
            for path in sorted(self.root.glob("*.toml")):
                name = path.stem
                try:
                    data = tomllib.loads(path.read_text())
                    data.setdefault("name", name)
                    if name in BUILTIN_SLOTS:
                        data.setdefault("type", BUILTIN_SLOTS[name])
                        data.setdefault("aliases", list(BUILTIN_ALIASES.get(name, ())))
                    if data["name"] != name:
                        raise ConfigError(f"name {data['name']!r} does not match the file name")
                    configs[name] = SlotConfig.from_mapping(data, builtin=name in BUILTIN_SLOTS)
                except (tomllib.TOMLDecodeError, ConfigError, InvalidRequest) as exc:
                    raise ConfigError(f"{path}: {exc}") from exc
        return configs

    def save(self, config: SlotConfig) -> None:
        atomic_write_text(self.path(config.name), config.to_toml())

    def delete(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass


__all__ = ["ConfigStore", "SlotConfig", "validate_ref", "validate_slot_name"]
