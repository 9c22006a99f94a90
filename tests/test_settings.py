"""Settings: defaults <- hal0.toml <- HAL0_* environment <- overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal0.errors import ConfigError
from hal0.settings import load_settings


def test_hal0_home_puts_everything_under_one_folder(tmp_path: Path) -> None:
    s = load_settings(env={"HAL0_HOME": str(tmp_path)})
    assert s.config_dir == tmp_path / "config"
    assert s.state_dir == tmp_path / "state"
    assert s.log_dir == tmp_path / "logs"
    assert (s.host, s.port, s.port_min, s.port_max) == ("127.0.0.1", 8080, 8081, 8099)


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "hal0.toml").write_text('port = 9000\nport_min = 9100\nport_max = 9110\n')
    s = load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PORT_MIN": "9105"})
    assert (s.port, s.port_min, s.port_max) == (9000, 9105, 9110)
    s = load_settings(env={"HAL0_HOME": str(tmp_path)}, overrides={"port": 9001})
    assert s.port == 9001


def test_bad_settings_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port_min must be int"):
        load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PORT_MIN": "many"})
    with pytest.raises(ConfigError, match="supervisor"):
        load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_SUPERVISOR": "docker"})
    with pytest.raises(ConfigError, match="stream_batch_ms must be between 0 and 1000"):
        load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_STREAM_BATCH_MS": "-1"})


def test_a_built_in_slot_file_without_a_type_keeps_the_built_in_type(tmp_path: Path) -> None:
    from hal0.slots.config import ConfigStore

    (tmp_path / "embed.toml").write_text('model = "some-embedder"\n')
    (tmp_path / "mine.toml").write_text('model = "x"\n')
    configs = ConfigStore(tmp_path).load_all()
    assert (configs["embed"].type, configs["embed"].model, configs["embed"].builtin) == ("embed", "some-embedder", True)
    assert configs["mine"].type == "chat" and not configs["mine"].builtin
