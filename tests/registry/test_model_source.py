"""The slots' ModelSource over the registry: installed models are served from the store alone; the pull
machinery (its module, the catalog's) is imported and built on first use, sharing the store."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from hal0.api.app import RegistryModels
from hal0.events import EventBus
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.store import ModelStore
from hal0.settings import Settings


def test_an_installed_model_is_found_without_building_the_pull_machinery(settings: Settings, tmp_path: Path) -> None:
    ModelStore(settings.models_dir).import_file("tiny", generate_gguf(tmp_path / "tiny.gguf", TINY))
    models = RegistryModels(settings, EventBus())
    path = models.path("tiny")
    assert path is not None and path.is_file() and path.parent.name == "tiny"
    models.check("tiny")
    assert models.path("absent") is None
    models.cancel_pull("absent")  # nothing was ever pulled: nothing to cancel, nothing built
    assert models._registry is None
    registry = models.registry()
    assert registry.store is models.store, "one store: its manifest cache is shared"
    assert registry.model_path("tiny") == path
    assert models.registry() is registry


def test_the_edge_imports_no_pull_machinery_until_asked(tmp_path: Path) -> None:
    """What an API restarted over installed models imports before it serves: no pull module, no catalog."""
    script = textwrap.dedent("""
        import sys
        import hal0.api.app, hal0.cli, hal0.server
        from hal0.api.app import RegistryModels
        from hal0.events import EventBus
        from hal0.settings import Settings
        from pathlib import Path
        home = Path(sys.argv[1])
        settings = Settings(config_dir=home / "config", state_dir=home / "state", log_dir=home / "logs")
        models = RegistryModels(settings, EventBus())
        models.path("tiny")
        before = sorted(m for m in ("hal0.registry.pull", "hal0.registry.catalog") if m in sys.modules)
        assert not models.pullable("not-in-the-catalog")
        print(before, "hal0.registry.catalog" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]
