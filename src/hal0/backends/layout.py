"""What a speech model's folder must hold, per engine: read by the providers (to fail early and plainly)
and by the servers (to pick the engine). Pure file checks; nothing heavy is imported here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hal0.datatypes import datatype

#: Moonshine's on-device runtime reads these (the layout of download.moonshine.ai/model/<name>/quantized/).
MOONSHINE_FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")
#: A CTranslate2 conversion of Whisper, as faster-whisper loads it.
WHISPER_FILES = ("model.bin", "config.json")
WHISPER_TOKENIZERS = ("tokenizer.json", "vocabulary.txt", "vocabulary.json")

#: Python modules each engine needs, and the pip extra that installs them.
RUNTIME_MODULES = {
    "moonshine": ("moonshine_voice", "soundfile"),
    "whisper": ("faster_whisper", "soundfile"),
    "kokoro": ("kokoro_onnx", "soundfile"),
}
RUNTIME_EXTRAS = {"moonshine": "hal0[speech]", "whisper": "hal0[speech]", "kokoro": "hal0[speech]"}


@datatype(frozen=True, slots=True)
class LayoutProblem:
    """Why a folder is not a model this provider can serve."""

    message: str
    missing: tuple[str, ...]


def model_dir(model_path: Path) -> Path:
    """A slot's model path is the manifest's primary file; multi-file models live in its folder."""
    return model_path if model_path.is_dir() else model_path.parent


def stt_engine(directory: Path) -> str | LayoutProblem:
    """`moonshine` or `whisper` from the files present; a LayoutProblem naming what is missing otherwise."""
    if all((directory / name).is_file() for name in MOONSHINE_FILES):
        return "moonshine"
    if all((directory / name).is_file() for name in WHISPER_FILES):
        if not any((directory / name).is_file() for name in WHISPER_TOKENIZERS):
            return LayoutProblem("the Whisper (CTranslate2) model has no tokenizer.json or vocabulary file",
                                 ("tokenizer.json",))
        return "whisper"
    have = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    missing = tuple(n for n in MOONSHINE_FILES if not (directory / n).is_file())
    return LayoutProblem(
        f"{directory.name}/ is not a speech-to-text model this provider can run: Moonshine needs "
        f"{', '.join(MOONSHINE_FILES)}; Whisper (CTranslate2) needs {', '.join(WHISPER_FILES)} and "
        f"tokenizer.json (found: {', '.join(have) or 'nothing'})", missing)


@datatype(frozen=True, slots=True)
class KokoroFiles:
    model: Path
    voices: Path


def kokoro_files(model_path: Path) -> KokoroFiles | LayoutProblem:
    """The ONNX model and its voice pack (`.npz` or kokoro-onnx's `voices*.bin`) side by side."""
    directory = model_dir(model_path)
    if model_path.is_file() and model_path.suffix == ".onnx":
        model: Path | None = model_path
    else:
        onnx = sorted(directory.glob("*.onnx"))
        model = onnx[0] if onnx else None
    voices = sorted(directory.glob("*.npz")) + sorted(directory.glob("voices*.bin"))
    missing = tuple(name for name, found in (("kokoro *.onnx model", model), ("voice pack (*.npz or voices*.bin)",
                                                                              voices[0] if voices else None))
                    if found is None)
    if model is None or not voices:
        return LayoutProblem(f"{directory.name}/ is not a Kokoro model: missing {' and '.join(missing)}", missing)
    return KokoroFiles(model, voices[0])


def missing_modules(engine: str) -> list[str]:
    """Modules of `engine`'s runtime that are not importable (found without importing them)."""
    return [m for m in RUNTIME_MODULES[engine] if importlib.util.find_spec(m) is None]
