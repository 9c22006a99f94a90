"""Read the metadata a manifest records from a GGUF file header.

Only the header and tensor table are read (the file is memory-mapped), so this is cheap even for large models.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, TypedDict

from hal0.datatypes import datatype

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


@datatype(frozen=True)
class TensorInfo:
    """One entry of the tensor info table: enough to size weights per layer without reading them."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def layer(self) -> int | None:
        """The block index of `blk.N.*` tensors; None for the embeddings, output and norms outside blocks."""
        parts = self.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            return int(parts[1])
        return None


@datatype(frozen=True)
class GGUFLayout:
    """Every scalar KV value (arrays skipped) and the tensor table, for memory estimates."""

    values: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int

    @property
    def architecture(self) -> str:
        arch = self.values.get("general.architecture")
        return arch if isinstance(arch, str) else "llama"

    def arch_value(self, key: str) -> Any:
        return self.values.get(f"{self.architecture}.{key}")


def is_gguf(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


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
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            values, params, tensors = _parse(buf)
    except (IndexError, KeyError, OverflowError, struct.error, OSError) as exc:
        raise ValueError(f"unreadable GGUF ({type(exc).__name__}: {exc})") from exc
    meta: GGUFMetadata = {"tensor_count": tensors, "parameter_count": params}
    arch = values.get("general.architecture")
    if isinstance(arch, str):
        meta["architecture"] = arch
        ctx = values.get(f"{arch}.context_length")
        if isinstance(ctx, int):
            meta["context_length"] = ctx
    for key, field in (("general.name", "name"), ("general.size_label", "size_label")):
        if isinstance(values.get(key), str):
            meta[field] = values[key]  # type: ignore[literal-required]
    file_type = values.get("general.file_type")
    if isinstance(file_type, int):
        meta["file_type"] = _file_type_name(file_type)
    qv = values.get("general.quantization_version")
    if isinstance(qv, int):
        meta["quantization_version"] = qv
    return meta


def read_gguf_layout(path: Path) -> GGUFLayout:
    """The KV values and the tensor info table of a GGUF file (header only; the weights are not read).

    Raises ValueError when the file is not a readable GGUF.
    """
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            values, tensors = _parse_layout(buf)
    except (IndexError, KeyError, OverflowError, struct.error, OSError) as exc:
        raise ValueError(f"unreadable GGUF ({type(exc).__name__}: {exc})") from exc
    align = values.get("general.alignment")
    return GGUFLayout(values=values, tensors=tensors, alignment=align if isinstance(align, int) else 32)


# ggml types -> (elements per block, bytes per block), from ggml.h / gguf-py's GGML_QUANT_SIZES; kept here so
# reading a layout needs no gguf package (the GPU bench runs with numpy alone).
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor: elements / block size, times bytes per block of its ggml type."""
    try:
        block, size = GGML_BLOCKS[ggml_type]
    except KeyError as exc:
        raise KeyError(f"unknown ggml type {ggml_type}") from exc
    n = 1
    for d in shape:
        n *= d
    return n // block * size


# GGUF value types -> struct formats of the fixed-size ones (8 is a string, 9 an array).
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Walks the header without materialising arrays: a 150k-token vocabulary is skipped, not decoded
    (the gguf package's reader builds every token, which takes seconds to minutes on big vocabularies)."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.buf):
            raise IndexError("GGUF header runs past the end of the file")

    def string(self) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, typ: int) -> Any:
        """A scalar or string value; arrays are skipped (None)."""
        if typ in _FIXED:
            return self.take(_FIXED[typ])
        if typ == _STRING:
            return self.string()
        if typ != _ARRAY:
            raise KeyError(f"unknown GGUF value type {typ}")
        elem, count = self.take("<I"), self.take("<Q")
        if elem in _FIXED:
            self.skip(count * struct.calcsize(_FIXED[elem]))
        elif elem == _STRING:
            for _ in range(count):
                self.skip(self.take("<Q"))
        else:
            for _ in range(count):
                self.value(elem)
        return None


def _header(buf: mmap.mmap) -> tuple[_Cursor, dict[str, Any], int]:
    cur = _Cursor(buf)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise KeyError("not a GGUF file (bad magic)")
    cur.skip(4)
    version = cur.take("<I")
    if version < 2:
        raise KeyError(f"GGUF version {version} is too old")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    values: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        values[key] = cur.value(cur.take("<I"))
    return cur, values, n_tensors


def _parse_layout(buf: mmap.mmap) -> tuple[dict[str, Any], tuple[TensorInfo, ...]]:
    cur, values, n_tensors = _header(buf)
    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = cur.string()
        shape = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        typ, offset = cur.take("<I"), cur.take("<Q")
        tensors.append(TensorInfo(name, typ, shape, offset, tensor_nbytes(typ, shape)))
    return values, tuple(tensors)


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], int, int]:
    cur, values, n_tensors = _header(buf)
    params = 0
    for _ in range(n_tensors):
        cur.string()
        n_dims = cur.take("<I")
        n = 1
        for _ in range(n_dims):
            n *= cur.take("<Q")
        cur.take("<I")  # type
        cur.take("<Q")  # offset
        params += n
    return values, params, n_tensors
