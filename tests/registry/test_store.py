"""The store: ref validation, import with GGUF metadata, removal rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from hal0.errors import Conflict, InvalidRef, InvalidRequest, ModelInUse, ModelNotFound
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.pull import Registry
from hal0.registry.store import MANIFEST, ModelStore, sha256_file, validate_ref


@pytest.mark.parametrize("ref", ["../etc", "..", ".", "a/b", "/abs", "a\\b", "UPPER", "", "a..b", ".hidden",
                                 "-dash", "x" * 97, "a b", "caf\u00e9", "a\x00b", "a/../../b", "trailing\n"])
def test_ref_validation_rejects_traversal_and_junk(ref: str) -> None:
    with pytest.raises(InvalidRef):
        validate_ref(ref)


@pytest.mark.parametrize("ref", ["qwen2.5-0.5b-instruct-q4_k_m", "a", "0", "x" * 96, "bge_small.v1"])
def test_ref_validation_accepts_sane_refs(ref: str) -> None:
    assert validate_ref(ref) == ref


def test_store_paths_never_leave_the_models_dir(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    for bad in ("../x", "..", "a/../../b"):
        with pytest.raises(InvalidRef):
            store.model_dir(bad)
    with pytest.raises(InvalidRef):
        store.file_path("ok", "../manifest")


def test_import_of_generated_gguf_fills_manifest_metadata(registry: Registry, tmp_path: Path) -> None:
    src = generate_gguf(tmp_path / "tiny.gguf", TINY)
    manifest = registry.import_file("tiny", src)
    assert manifest.format == "gguf"
    assert manifest.provider == "llama.cpp"
    assert manifest.slot_type == "chat"
    meta = manifest.metadata
    assert meta["architecture"] == "llama"
    assert meta["context_length"] == TINY.context
    assert meta["parameter_count"] > 0
    assert isinstance(meta["file_type"], str) and meta["file_type"]
    (f,) = manifest.files
    assert f.sha256 == sha256_file(src) and f.size == src.stat().st_size
    # What is on disk reads back identically, and the list shows it.
    assert registry.get("tiny") == manifest
    assert [m.ref for m in registry.list_models()] == ["tiny"]
    assert registry.model_path("tiny").read_bytes() == src.read_bytes()
    assert not list(registry.store.model_dir("tiny").glob("*.partial"))


def test_import_by_hard_link_shares_the_inode(registry: Registry, tmp_path: Path) -> None:
    src = generate_gguf(tmp_path / "tiny.gguf", TINY)
    registry.import_file("linked", src, link=True)
    assert registry.model_path("linked").stat().st_ino == src.stat().st_ino


def test_import_refuses_existing_ref_and_missing_file(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "plain.bin"
    src.write_bytes(b"not a gguf")
    manifest = registry.import_file("plain", src, slot_type="tts", provider="kokoro")
    assert (manifest.format, manifest.metadata, manifest.slot_type) == ("bin", {}, "tts")
    with pytest.raises(Conflict) as exc:
        registry.import_file("plain", src)
    assert exc.value.code == "model_exists"
    with pytest.raises(InvalidRequest):
        registry.import_file("other", tmp_path / "missing.gguf")


def test_rm_of_in_use_ref_is_refused(registry: Registry, tmp_path: Path) -> None:
    src = generate_gguf(tmp_path / "tiny.gguf", TINY)
    registry.import_file("tiny", src)
    with pytest.raises(ModelInUse) as exc:
        registry.remove("tiny", lambda ref: ["primary"] if ref == "tiny" else [])
    assert exc.value.status == 409 and exc.value.detail["slots"] == ["primary"]
    assert registry.exists("tiny")
    registry.remove("tiny", lambda ref: [])
    assert not registry.exists("tiny")
    assert not registry.store.model_dir("tiny").exists()
    assert not [p for p in registry.store.root.iterdir() if p.name.startswith(".trash")]
    with pytest.raises(ModelNotFound):
        registry.remove("tiny", lambda ref: [])


def test_a_folder_without_manifest_is_not_a_model(registry: Registry) -> None:
    d = registry.store.model_dir("half")
    d.mkdir(parents=True)
    (d / "x.gguf.partial").write_bytes(b"123")
    assert registry.list_models() == []
    with pytest.raises(ModelNotFound):
        registry.get("half")
    assert not (d / MANIFEST).exists()


def test_a_manifest_is_read_once_until_its_file_is_replaced(registry: Registry, tmp_path: Path) -> None:
    src = generate_gguf(tmp_path / "tiny.gguf", TINY)
    registry.import_file("tiny", src)
    first = registry.store.get("tiny")
    assert registry.store.get("tiny") is first  # a load asks 3-4 times: one read
    # Another process (a CLI import, a hand edit) replaces the file: the next get reads it again.
    path = registry.store.manifest_path("tiny")
    data = path.read_text().replace('"chat"', '"embed"')
    (path.parent / "new.json").write_text(data)
    (path.parent / "new.json").replace(path)
    assert registry.store.get("tiny").slot_type == "embed"
    path.unlink()
    with pytest.raises(ModelNotFound):
        registry.store.get("tiny")
