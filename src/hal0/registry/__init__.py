"""The model registry: models on disk, pulls, the catalog and loadouts."""

from hal0.registry.pull import PullEvent, Registry
from hal0.registry.store import Manifest, ModelFile, validate_ref

__all__ = ["Manifest", "ModelFile", "PullEvent", "Registry", "validate_ref"]
