"""Models on disk: `<models_dir>/<ref>/` holds the files and `manifest.json`.

A model exists exactly when its manifest does; the manifest is written last and atomically, so a crash never
leaves something that looks installed but is not. Every path is derived from a validated ref.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import field
from pathlib import Path
from typing import Any

from hal0.datatypes import datatype
from hal0.errors import (
    Conflict,
    InsufficientDisk,
    InvalidRef,
    InvalidRequest,
    ModelChanged,
    ModelInUse,
    ModelNotFound,
    RegistryError,
)
from hal0.fsio import atomic_write_json

MAX_REF_LEN = 96
_REF_RE = r"[a-z0-9][a-z0-9._-]*"
_FILENAME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
#: Kept free beyond the download itself so a pull never fills the disk to the last byte.
DISK_MARGIN_BYTES = 256 * 1024 * 1024
_CHUNK = 1024 * 1024
_EMBED_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "xlm-roberta", "t5encoder"})
_FORMATS = {".gguf": "gguf", ".onnx": "onnx", ".safetensors": "safetensors", ".pth": "pytorch",
            ".pt": "pytorch", ".bin": "bin", ".npz": "npz", ".json": "json"}


def validate_ref(ref: str) -> str:
    """Return `ref` if it is a legal model ref (lowercase letters, digits, `.`, `_`, `-`); else InvalidRef."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_LEN or not re.fullmatch(_REF_RE, ref) or ".." in ref:
        raise InvalidRef(
            f"invalid model ref {str(ref)[:80]!r}: use 1-{MAX_REF_LEN} of a-z 0-9 . _ - starting with a-z or 0-9",
            detail={"ref": str(ref)[:200]},
        )
    return ref


def validate_filename(name: str) -> str:
    """A model file name: one path component, no hidden files, nothing the store uses itself."""
    if (not re.fullmatch(_FILENAME_RE, name) or len(name) > 200 or ".." in name or name == MANIFEST
            or name.endswith(PARTIAL_SUFFIX)):
        raise InvalidRef(f"invalid model file name {name!r}", detail={"file": name[:200]})
    return name


def guess_format(name: str) -> str:
    return _FORMATS.get(Path(name).suffix.lower(), "unknown")


def sha256_file(path: Path) -> str:
    import hashlib  # only imports, pulls and checks hash: a start reads manifests, never a digest

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_free_space(directory: Path, needed: int) -> None:
    import shutil  # this module is read by every start (manifests, refs); shutil only by imports and pulls

    free = shutil.disk_usage(directory).free
    if needed + DISK_MARGIN_BYTES > free:
        raise InsufficientDisk(
            f"not enough disk space in {directory}: need {needed} bytes (+{DISK_MARGIN_BYTES} margin), "
            f"{free} free",
            detail={"needed": needed, "free": free, "margin": DISK_MARGIN_BYTES},
        )


@datatype(frozen=True, slots=True)
class ModelFile:
    """One file of an installed model, as its manifest records it."""
    name: str
    size: int
    sha256: str
    source: str | None = None
    #: The file's mtime when the manifest was written: with the size, a cheap check that it is unchanged.
    mtime_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "source": self.source,
                "mtime_ns": self.mtime_ns}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFile:
        mtime = data.get("mtime_ns")
        return cls(name=validate_filename(str(data["name"])), size=int(data["size"]),
                   sha256=str(data["sha256"]), source=data.get("source"),
                   mtime_ns=int(mtime) if isinstance(mtime, int) else None)


@datatype(frozen=True, slots=True)
class Manifest:
    """An installed model: its ref, where it came from, its files and the hints for a slot."""
    ref: str
    source: str
    files: tuple[ModelFile, ...]
    format: str
    #: Hints for slot creation; the slot's own config decides.
    provider: str | None = None
    slot_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def primary_file(self) -> ModelFile:
        """The file a backend is pointed at (the first GGUF shard, or the first file)."""
        return self.files[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "source": self.source, "files": [f.to_dict() for f in self.files],
            "format": self.format, "provider": self.provider, "slot_type": self.slot_type,
            "metadata": self.metadata, "created_at": self.created_at, "size": self.size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            ref=validate_ref(str(data["ref"])), source=str(data["source"]),
            files=tuple(ModelFile.from_dict(f) for f in data["files"]), format=str(data["format"]),
            provider=data.get("provider"), slot_type=data.get("slot_type"),
            metadata=dict(data.get("metadata") or {}), created_at=float(data.get("created_at") or 0.0),
        )


def describe_files(directory: Path, files: Iterable[ModelFile]) -> tuple[str, dict[str, Any], str | None]:
    """(format, metadata, slot-type hint) read from the files themselves."""
    files = list(files)
    fmt = guess_format(files[0].name) if files else "unknown"
    path = directory / files[0].name if files else None
    from hal0.registry.gguf import is_gguf, read_gguf_metadata  # only when a model is installed

    if path is not None and is_gguf(path):
        fmt = "gguf"
        try:
            meta: dict[str, Any] = dict(read_gguf_metadata(path))
        except (ValueError, OSError) as exc:
            raise RegistryError(f"{files[0].name} looks like GGUF but cannot be read: {exc}",
                                code="bad_model_file") from exc
        arch = meta.get("architecture")
        hint = "embed" if arch in _EMBED_ARCHS else ("chat" if arch else None)
        return fmt, meta, hint
    return fmt, {}, None


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        #: Manifests read, by ref, with the identity of the file they were read from (a load reads one 3-4
        #: times; a stat says whether the file is still that one).
        self._read: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    def model_dir(self, ref: str) -> Path:
        return self.root / validate_ref(ref)

    def manifest_path(self, ref: str) -> Path:
        return self.model_dir(ref) / MANIFEST

    def exists(self, ref: str) -> bool:
        return self.manifest_path(ref).is_file()

    def get(self, ref: str) -> Manifest:
        path = self.manifest_path(ref)
        try:
            st = path.stat()
            # Manifests are replaced by a rename (a new inode), never rewritten in place.
            identity = (st.st_ino, st.st_mtime_ns, st.st_size)
            known = self._read.get(ref)
            if known is not None and known[0] == identity:
                return known[1]
            data = json.loads(path.read_text())
        except FileNotFoundError:
            self._read.pop(ref, None)
            raise ModelNotFound(f"model {ref!r} is not installed", detail={"ref": ref}) from None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"manifest of {ref!r} is unreadable: {exc}", code="bad_manifest") from exc
        manifest = Manifest.from_dict(data)
        self._read[ref] = (identity, manifest)
        return manifest

    def list_models(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        out: list[Manifest] = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            with contextlib.suppress(RegistryError, KeyError, TypeError):
                out.append(self.get(child.name))
        return out

    def primary_path(self, ref: str) -> Path:
        """The file a backend loads for `ref` (its manifest's primary file)."""
        return self.file_path(ref, self.get(ref).primary_file.name)

    def file_path(self, ref: str, name: str) -> Path:
        return self.model_dir(ref) / validate_filename(name)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.model_dir(manifest.ref) / MANIFEST, manifest.to_dict())

    def finish(self, ref: str, source: str, files: list[ModelFile], *, slot_type: str | None = None,
               provider: str | None = None, fmt: str | None = None) -> Manifest:
        """Describe the (complete, verified) files of `ref` and write its manifest."""
        detected_fmt, metadata, type_hint = describe_files(self.model_dir(ref), files)
        files = [dataclasses.replace(f, mtime_ns=self.file_path(ref, f.name).stat().st_mtime_ns) for f in files]
        fmt = fmt or detected_fmt
        if provider is None and fmt == "gguf":
            provider = "llama.cpp"
        manifest = Manifest(ref=ref, source=source, files=tuple(files), format=fmt, provider=provider,
                            slot_type=slot_type or type_hint, metadata=metadata, created_at=time.time())
        self.write_manifest(manifest)
        return manifest

    def check(self, ref: str) -> Manifest:
        """The cheap check before a load: every file of `ref` has the size (and mtime) its manifest recorded.
        A file replaced, truncated or rewritten after import raises ModelChanged; `verify` reads it whole."""
        manifest = self.get(ref)
        for f in manifest.files:
            path = self.file_path(ref, f.name)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise ModelChanged(f"file {f.name} of model {ref!r} is missing; pull or import the model again",
                                   detail={"ref": ref, "file": f.name}) from None
            if st.st_size != f.size or (f.mtime_ns is not None and st.st_mtime_ns != f.mtime_ns):
                raise ModelChanged(
                    f"file {f.name} of model {ref!r} changed on disk since it was installed (size {f.size} -> "
                    f"{st.st_size} bytes); `hal0 model verify {ref}` checks its sha256, or import it again",
                    detail={"ref": ref, "file": f.name, "size": f.size, "size_on_disk": st.st_size,
                            "mtime_ns": f.mtime_ns, "mtime_ns_on_disk": st.st_mtime_ns})
        return manifest

    def verify(self, ref: str) -> dict[str, Any]:
        """Hash every file of `ref` against its manifest (slow: reads them whole; run it off the event loop).
        Files whose sha256 matches are stamped with their current mtime, so a touched but intact file loads."""
        manifest = self.get(ref)
        results: list[dict[str, Any]] = []
        stamped: list[ModelFile] = []
        for f in manifest.files:
            path = self.file_path(ref, f.name)
            entry: dict[str, Any] = {"name": f.name, "sha256": f.sha256, "size": f.size}
            if not path.is_file():
                entry.update(ok=False, problem="missing")
                stamped.append(f)
            else:
                digest = sha256_file(path)
                st = path.stat()
                entry.update(ok=digest == f.sha256 and st.st_size == f.size, sha256_on_disk=digest,
                             size_on_disk=st.st_size)
                if not entry["ok"]:
                    entry["problem"] = "sha256 differs" if digest != f.sha256 else "size differs"
                stamped.append(dataclasses.replace(f, mtime_ns=st.st_mtime_ns) if entry["ok"] else f)
            results.append(entry)
        ok = all(r["ok"] for r in results)
        if ok:
            self.write_manifest(dataclasses.replace(manifest, files=tuple(stamped)))
        return {"ref": ref, "ok": ok, "files": results}

    def import_file(self, ref: str, path: Path, *, link: bool = False, slot_type: str | None = None,
                    provider: str | None = None) -> Manifest:
        """Install a local file as `ref`, by hard link (falling back to copy across devices) or by copy."""
        validate_ref(ref)
        path = Path(path)
        if not path.is_file():
            raise InvalidRequest(f"no such file to import: {path}", detail={"path": str(path)})
        if self.exists(ref):
            raise Conflict(f"model {ref!r} already exists; remove it first", code="model_exists",
                           detail={"ref": ref})
        name = validate_filename(path.name)
        directory = self.model_dir(ref)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / name
        partial = directory / (name + PARTIAL_SUFFIX)
        partial.unlink(missing_ok=True)
        linked = False
        if link:
            try:
                os.link(path, partial)
                linked = True
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        if not linked:
            ensure_free_space(directory, path.stat().st_size)
            import shutil

            shutil.copyfile(path, partial)
        try:
            digest = sha256_file(partial)
            os.replace(partial, final)
            files = [ModelFile(name=name, size=final.stat().st_size, sha256=digest, source=f"file:{path}")]
            return self.finish(ref, f"file:{path}", files, slot_type=slot_type, provider=provider)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def remove(self, ref: str, in_use: Callable[[str], list[str]]) -> Manifest:
        """Delete `ref` unless a slot uses it (ModelInUse, 409). Returns the manifest that was removed."""
        manifest = self.get(ref)
        slots = in_use(ref)
        if slots:
            raise ModelInUse(f"model {ref!r} is used by slot(s) {', '.join(slots)}; reassign them first",
                             detail={"ref": ref, "slots": slots})
        self.purge(ref)
        return manifest

    def purge(self, ref: str) -> None:
        """Remove everything under `ref`: moved aside first, so the ref vanishes in one rename."""
        directory = self.model_dir(ref)
        if not directory.exists():
            return
        import shutil

        trash = self.root / f".trash-{ref}-{os.urandom(4).hex()}"
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

