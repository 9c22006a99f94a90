"""The built-in catalog: well-known refs, where to get them, and the slot type they fit.

`size` is the published file size, used only for disk and memory estimates before a pull. `sha256` is set
only where the published value is known; when it is None the pull takes the hash from the source's own
metadata (Hugging Face's X-Linked-ETag for LFS files) and otherwise records the hash it computed. No hash here
is ever made up.
"""

from __future__ import annotations

from typing import Any

from hal0.datatypes import datatype
from hal0.registry.store import validate_ref

_MB = 1000 * 1000


@datatype(frozen=True, slots=True)
class CatalogFile:
    source: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "sha256": self.sha256}


@datatype(frozen=True, slots=True)
class CatalogEntry:
    ref: str
    slot_type: str
    provider: str
    files: tuple[CatalogFile, ...]
    description: str = ""

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "slot_type": self.slot_type, "provider": self.provider,
                "files": [f.to_dict() for f in self.files], "size": self.size,
                "description": self.description}


def _moonshine(model: str) -> tuple[CatalogFile, ...]:
    base = f"https://download.moonshine.ai/model/{model}/quantized/{model}"
    return tuple(CatalogFile(f"{base}/{name}") for name in
                 ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin"))


def _hf(path: str, size_mb: float | None = None, sha256: str | None = None) -> CatalogFile:
    return CatalogFile(f"hf:{path}", None if size_mb is None else int(size_mb * _MB), sha256)


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("qwen2.5-0.5b-instruct-q4_k_m", "chat", "llama.cpp",
                 (_hf("Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", 491),),
                 "Qwen2.5 0.5B Instruct, Q4_K_M: a small chat model that runs on any CPU"),
    CatalogEntry("qwen2.5-1.5b-instruct-q4_k_m", "chat", "llama.cpp",
                 (_hf("Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf", 1120),),
                 "Qwen2.5 1.5B Instruct, Q4_K_M"),
    CatalogEntry("qwen2.5-7b-instruct-q4_k_m", "chat", "llama.cpp",
                 (_hf("bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-Q4_K_M.gguf", 4680),),
                 "Qwen2.5 7B Instruct, Q4_K_M"),
    CatalogEntry("qwen2.5-14b-instruct-q4_k_m", "chat", "llama.cpp",
                 (_hf("bartowski/Qwen2.5-14B-Instruct-GGUF/Qwen2.5-14B-Instruct-Q4_K_M.gguf", 8990),),
                 "Qwen2.5 14B Instruct, Q4_K_M"),
    CatalogEntry("qwen2.5-32b-instruct-q4_k_m", "chat", "llama.cpp",
                 (_hf("bartowski/Qwen2.5-32B-Instruct-GGUF/Qwen2.5-32B-Instruct-Q4_K_M.gguf", 19850),),
                 "Qwen2.5 32B Instruct, Q4_K_M"),
    CatalogEntry("nomic-embed-text-v1.5-q4_k_m", "embed", "llama.cpp",
                 (_hf("nomic-ai/nomic-embed-text-v1.5-GGUF/nomic-embed-text-v1.5.Q4_K_M.gguf", 84),),
                 "nomic-embed-text v1.5, Q4_K_M: 768-dim text embeddings"),
    CatalogEntry("bge-small-en-v1.5-q8_0", "embed", "llama.cpp",
                 (_hf("CompendiumLabs/bge-small-en-v1.5-gguf/bge-small-en-v1.5-q8_0.gguf", 37),),
                 "BGE small en v1.5, Q8_0: 384-dim English embeddings"),
    # Moonshine's runtime reads its own .ort layout, published by Moonshine AI (the Hugging Face ONNX
    # exports are a different format it cannot load).
    CatalogEntry("moonshine-tiny-en", "stt", "moonshine", _moonshine("tiny-en"),
                 "Moonshine tiny (English): fast on-device speech-to-text"),
    CatalogEntry("moonshine-base-en", "stt", "moonshine", _moonshine("base-en"),
                 "Moonshine base (English): on-device speech-to-text"),
    CatalogEntry("kokoro-82m", "tts", "kokoro",
                 (CatalogFile("https://github.com/thewh1teagle/kokoro-onnx/releases/download/"
                              "model-files-v1.0/kokoro-v1.0.onnx", 310 * _MB),
                  CatalogFile("https://github.com/thewh1teagle/kokoro-onnx/releases/download/"
                              "model-files-v1.0/voices-v1.0.bin", 27 * _MB)),
                 "Kokoro 82M (ONNX) with the v1.0 voice pack: text-to-speech"),
    CatalogEntry("kokoro-82m-int8", "tts", "kokoro",
                 (CatalogFile("https://github.com/thewh1teagle/kokoro-onnx/releases/download/"
                              "model-files-v1.0/kokoro-v1.0.int8.onnx", 88 * _MB),
                  CatalogFile("https://github.com/thewh1teagle/kokoro-onnx/releases/download/"
                              "model-files-v1.0/voices-v1.0.bin", 27 * _MB)),
                 "Kokoro 82M (ONNX, int8 weights) with the v1.0 voice pack: text-to-speech on small CPUs"),
)

_BY_REF = {e.ref: e for e in CATALOG}
assert len(_BY_REF) == len(CATALOG) and all(validate_ref(r) == r for r in _BY_REF)


def lookup(ref: str) -> CatalogEntry | None:
    return _BY_REF.get(ref)


def search(query: str = "", slot_type: str | None = None) -> list[CatalogEntry]:
    """Entries whose ref or description contains every word of `query`, optionally of one slot type."""
    words = query.lower().split()
    out = []
    for entry in CATALOG:
        if slot_type and entry.slot_type != slot_type:
            continue
        text = f"{entry.ref} {entry.description} {entry.provider}".lower()
        if all(w in text for w in words):
            out.append(entry)
    return out
