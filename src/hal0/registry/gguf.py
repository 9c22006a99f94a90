"""Read the metadata a manifest records from a GGUF file header.

Only the header and tensor table are read (the file is memory-mapped), so this is cheap even for large models.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, TypedDict

GGUF_MAGIC = b"GGUF"


class GGUFMetadata(TypedDict, total=False):
    architecture: str
    name: str
    parameter_count: int
    context_length: int
    file_type: str
    quantization_version: int
    size_label: str
    tensor_count: int


def is_gguf(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def _scalar(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _file_type_name(value: int) -> str:
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(value).name
    except ValueError:
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf_metadata(path: Path) -> GGUFMetadata:
    """Architecture, parameter count, context length and file type of a GGUF file.

    Raises ValueError when the file is not a readable GGUF.
    """
    from gguf import GGUFReader

    try:
        return _read(GGUFReader(path, "r"))
    except (IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError) as exc:
        # The gguf package reports a truncated or damaged file with whatever its parser tripped on.
        raise ValueError(f"unreadable GGUF ({type(exc).__name__}: {exc})") from exc


def _read(reader: Any) -> GGUFMetadata:
    meta: GGUFMetadata = {}
    arch = _scalar(reader, "general.architecture")
    if isinstance(arch, str):
        meta["architecture"] = arch
        ctx = _scalar(reader, f"{arch}.context_length")
        if isinstance(ctx, int):
            meta["context_length"] = ctx
    name = _scalar(reader, "general.name")
    if isinstance(name, str):
        meta["name"] = name
    size_label = _scalar(reader, "general.size_label")
    if isinstance(size_label, str):
        meta["size_label"] = size_label
    file_type = _scalar(reader, "general.file_type")
    if isinstance(file_type, int):
        meta["file_type"] = _file_type_name(file_type)
    qv = _scalar(reader, "general.quantization_version")
    if isinstance(qv, int):
        meta["quantization_version"] = qv
    meta["tensor_count"] = len(reader.tensors)
    meta["parameter_count"] = int(sum(int(t.n_elements) for t in reader.tensors))
    return meta
