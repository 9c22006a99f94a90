"""The first-run demo: a generated random-weights GGUF registered as `hal0-demo-tiny` on `primary`.

It answers every request with noise; it exists so a fresh install can show a real chat completion offline.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hal0.registry.store import ModelStore
from hal0.slots.manager import SlotManager

DEMO_REF = "hal0-demo-tiny"


def install_demo_model(store: ModelStore) -> str:
    """Generate and import the demo model unless it is installed already; returns its ref."""
    if not store.exists(DEMO_REF):
        # Only a first run writes it: the generator's gguf and numpy stay out of every later start (0.18 s).
        from hal0.registry.generate import TINY, generate_gguf

        with tempfile.TemporaryDirectory(dir=store.root) as tmp:
            path = generate_gguf(Path(tmp) / "hal0-demo-tiny.gguf", TINY)
            store.import_file(DEMO_REF, path, slot_type="chat", provider="llama.cpp")
    return DEMO_REF


async def ensure_demo_model(store: ModelStore, manager: SlotManager) -> None:
    """On a first run (primary never configured), give `primary` the demo model."""
    store.root.mkdir(parents=True, exist_ok=True)
    ref = await asyncio.to_thread(install_demo_model, store)
    primary = manager.get("primary")
    if primary.config.model is None and not manager.configs.path("primary").exists():
        await manager.assign("primary", ref)
