"""A small, fast reader for GGUF metadata and tensor infos.

The supervisor needs a model's shape (layers, heads, context length) and the
byte size of every tensor to estimate memory before it starts a runner.  The
reference reader (gguf-py's ``GGUFReader``) materialises every array, so it
spends seconds building numpy views of a 262k-entry vocabulary we never look
at.  This reader maps the file, unpacks scalars in place and *skips* large
arrays: for a string array it only hops over the u64 length prefixes, for a
numeric array it jumps over ``count * size`` bytes.  Such arrays are recorded
as `ArrayInfo` (element type and length).

The tensor data itself is never touched; only the header pages are read.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(versions 2 and 3; version 1 used 32-bit counts and is no longer produced).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml refuses tensors with more dimensions than this (GGML_MAX_DIMS).
MAX_DIMS = 4

# Arrays at most this long are kept as Python lists.  Longer string arrays
# (vocabularies, merges) are skipped; numeric arrays up to MAX_NUMERIC_ARRAY
# are still kept because per-layer hyper-parameters (head_count_kv of a
# 120-layer model, say) are needed and cost one unpack call.
MAX_SMALL_ARRAY = 64
MAX_NUMERIC_ARRAY = 1024


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message says why and where."""


class GGUFValueType(IntEnum):
    """Metadata value types, numbered as in the GGUF spec."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct codes of the fixed-size value types
_SCALAR_CODES: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_SIZES: dict[int, int] = {t: struct.calcsize("<" + c) for t, c in _SCALAR_CODES.items()}


@dataclass(frozen=True)
class GGMLType:
    """Storage of one ggml tensor type: `type_size` bytes hold `block_size` elements."""

    id: int
    name: str
    block_size: int
    type_size: int


_QK_K = 256
# From gguf-py's GGML_QUANT_SIZES (gguf/constants.py), which mirrors ggml's
# type_traits table.  Ids 4, 5 and 31-33, 36-38 were removed from ggml.
GGML_TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 2 + 16),
        GGMLType(3, "Q4_1", 32, 2 + 2 + 16),
        GGMLType(6, "Q5_0", 32, 2 + 4 + 16),
        GGMLType(7, "Q5_1", 32, 2 + 2 + 4 + 16),
        GGMLType(8, "Q8_0", 32, 2 + 32),
        GGMLType(9, "Q8_1", 32, 4 + 4 + 32),
        GGMLType(10, "Q2_K", 256, 2 + 2 + _QK_K // 16 + _QK_K // 4),
        GGMLType(11, "Q3_K", 256, 2 + _QK_K // 4 + _QK_K // 8 + 12),
        GGMLType(12, "Q4_K", 256, 2 + 2 + _QK_K // 2 + 12),
        GGMLType(13, "Q5_K", 256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
        GGMLType(14, "Q6_K", 256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
        GGMLType(15, "Q8_K", 256, 4 + _QK_K + _QK_K // 8),
        GGMLType(16, "IQ2_XXS", 256, 2 + _QK_K // 4),
        GGMLType(17, "IQ2_XS", 256, 2 + _QK_K // 4 + _QK_K // 32),
        GGMLType(18, "IQ3_XXS", 256, 2 + _QK_K // 4 + _QK_K // 8),
        GGMLType(19, "IQ1_S", 256, 2 + _QK_K // 8 + _QK_K // 16),
        GGMLType(20, "IQ4_NL", 32, 2 + 16),
        GGMLType(21, "IQ3_S", 256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
        GGMLType(22, "IQ2_S", 256, 2 + _QK_K // 4 + _QK_K // 16),
        GGMLType(23, "IQ4_XS", 256, 2 + 2 + _QK_K // 2 + _QK_K // 64),
        GGMLType(24, "I8", 1, 1),
        GGMLType(25, "I16", 1, 2),
        GGMLType(26, "I32", 1, 4),
        GGMLType(27, "I64", 1, 8),
        GGMLType(28, "F64", 1, 8),
        GGMLType(29, "IQ1_M", 256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
        GGMLType(30, "BF16", 1, 2),
        GGMLType(34, "TQ1_0", 256, 2 + 4 * 13),
        GGMLType(35, "TQ2_0", 256, 2 + 64),
        GGMLType(39, "MXFP4", 32, 1 + 16),
        GGMLType(40, "NVFP4", 64, 4 + 32),
        GGMLType(41, "Q1_0", 128, 2 + 16),
    )
}

# llama.cpp's enum llama_ftype (include/llama.h), without the MOSTLY_ prefix:
# this is what general.file_type holds and what people call "the quantization".
LLAMA_FTYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    33: "Q4_0_4_4",
    34: "Q4_0_4_8",
    35: "Q4_0_8_8",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}


def ggml_type_name(type_id: int) -> str:
    t = GGML_TYPES.get(type_id)
    return t.name if t else f"UNKNOWN_{type_id}"


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array that was skipped rather than materialised."""

    type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry.

    `offset` is relative to the start of the tensor data section
    (`GGUFFile.data_offset`), as stored in the file.  `nbytes` comes from the
    ggml type table; for a type this reader does not know it is the distance
    to the next tensor (an upper bound that includes alignment padding).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


@dataclass(frozen=True)
class GGUFFile:
    """Everything in a GGUF header.  Shared through the cache: do not mutate `metadata`."""

    path: Path
    version: int
    byteorder: str  # "little" or "big"
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # where tensor data starts; also the size of the header
    file_size: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """`{architecture}.{suffix}`, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


# ------------------------------------------------------------------ parsing


class _Parser:
    """Cursor over the mapped header; every read checks bounds and says what it was reading."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0
        self.endian = "<"
        self._structs: dict[str, struct.Struct] = {}

    def _struct(self, code: str) -> struct.Struct:
        s = self._structs.get(code)
        if s is None:
            s = self._structs[code] = struct.Struct(self.endian + code)
        return s

    def truncated(self, need: int, at: int, what: str) -> GGUFError:
        return GGUFError(
            f"{self.path}: truncated GGUF file: needed {need} byte(s) at offset {at} "
            f"reading {what}, but the file is {self.size} bytes"
        )

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.truncated(n, self.pos, what)

    def unpack(self, code: str, what: str) -> Any:
        s = self._struct(code)
        self.need(s.size, what)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def u32(self, what: str) -> int:
        return self.unpack("I", what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(f"the value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(
                f"{self.path}: unknown GGUF value type {raw} for {what} at offset {at} "
                f"(known types are 0-12); the file is corrupt or from a newer GGUF version"
            ) from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        """The value of `what` (e.g. "key 'general.name'"), of type `vtype`."""
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of {what}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        return self.unpack(_SCALAR_CODES[vtype], f"the value of {what}")

    def array(self, what: str) -> list[Any] | ArrayInfo:
        etype = self.value_type(f"the array in {what}")
        count = self.u64(f"the length of the array in {what}")
        if etype == GGUFValueType.STRING:
            if count <= MAX_SMALL_ARRAY:
                return [self.string(f"element {i} of the array in {what}") for i in range(count)]
            self.skip_strings(count, what)
        elif etype == GGUFValueType.ARRAY:
            if count <= MAX_SMALL_ARRAY:
                return [self.array(f"element {i} of the array in {what}") for i in range(count)]
            for i in range(count):  # nested arrays are rare; skip them one by one
                self.array(f"element {i} of the array in {what}")
        else:
            size = _SCALAR_SIZES[etype]
            self.need(count * size, f"{count} elements of the array in {what}")
            if count <= MAX_NUMERIC_ARRAY:
                values = struct.unpack_from(f"{self.endian}{count}{_SCALAR_CODES[etype]}", self.buf, self.pos)
                self.pos += count * size
                return list(values)
            self.pos += count * size
        return ArrayInfo(etype, count)

    def skip_strings(self, count: int, what: str) -> None:
        """Hop over `count` length-prefixed strings.

        This loop is the whole cost of reading a model with a big vocabulary,
        so it is kept tight and has no bounds check inside: an out-of-range
        read raises, and the slow path then finds out where it went wrong.
        """
        try:
            if (self.endian == "<") == (sys.byteorder == "little"):
                pos = _hop_native(self.buf, self.pos, count)
            else:
                pos = _hop_struct(self._struct("Q").unpack_from, self.buf, self.pos, count)
        except (IndexError, struct.error):
            pos = self.size + 1
        if pos > self.size:
            self._locate_truncation(count, what)
        self.pos = pos

    def _locate_truncation(self, count: int, what: str) -> None:
        for i in range(count):
            self.string(f"element {i} of the array in {what}")
        raise AssertionError("unreachable: skip_strings overran but the slow path did not")  # pragma: no cover


def _hop_native(buf: Any, pos: int, count: int) -> int:
    """Skip `count` strings by reading their u64 lengths through u64 views.

    Indexing a memoryview cast to 'Q' is about a third cheaper than a
    struct.unpack_from call.  A cast view must start on an 8-byte boundary of
    the data it covers, so there is one view per residue r = pos % 8; the
    element at byte `pos` of view r is index pos >> 3.  The loop is unrolled
    four times to shave the per-iteration overhead.
    """
    whole = memoryview(buf)
    n = len(whole)
    views = tuple(whole[r : r + (n - r) // 8 * 8].cast("Q") for r in range(8))
    try:
        for _ in repeat(None, count >> 2):
            pos += 8 + views[pos & 7][pos >> 3]
            pos += 8 + views[pos & 7][pos >> 3]
            pos += 8 + views[pos & 7][pos >> 3]
            pos += 8 + views[pos & 7][pos >> 3]
        for _ in repeat(None, count & 3):
            pos += 8 + views[pos & 7][pos >> 3]
        return pos
    finally:
        # Release the exports, or the mmap could not be closed afterwards.
        for v in views:
            v.release()
        whole.release()


def _hop_struct(unpack: Any, buf: Any, pos: int, count: int) -> int:
    """Same as _hop_native for a file whose byte order is not the machine's."""
    for _ in repeat(None, count):
        pos += 8 + unpack(buf, pos)[0]
    return pos


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _parse(buf: Any, size: int, path: Path) -> GGUFFile:
    p = _Parser(buf, size, path)
    p.need(4, "the magic number")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file: expected magic {GGUF_MAGIC!r} at offset 0, "
            f"found {magic!r} (hex {magic.hex(' ')})"
        )
    p.pos = 4
    p.need(4, "the version")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0 and version >> 16:  # a small number stored big-endian
        p.endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    p.pos = 8
    if version not in SUPPORTED_VERSIONS:
        hint = " (GGUF v1 used 32-bit counts; re-convert the model with a current llama.cpp)" if version == 1 else ""
        raise GGUFError(
            f"{path}: unsupported GGUF version {version}; this reader supports versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}{hint}"
        )
    n_tensors = p.u64("the tensor count")
    n_kv = p.u64("the metadata key/value count")
    # Each key/value needs at least 13 bytes and each tensor info at least 24:
    # reject absurd counts (a corrupt header) before looping over them.
    if n_kv * 13 + n_tensors * 24 > size - p.pos:
        raise GGUFError(
            f"{path}: truncated or corrupt GGUF file: header announces {n_kv} key/values and "
            f"{n_tensors} tensors, which cannot fit in a {size}-byte file"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = p.string(f"the key of metadata entry {i}")
        vtype = p.value_type(f"key {key!r}")
        metadata[key] = p.value(vtype, f"key {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: invalid general.alignment {alignment!r}: must be a power of two")

    raw_tensors = [_read_tensor_info(p, i) for i in range(n_tensors)]
    data_offset = _align(p.pos, alignment)
    tensors = _size_tensors(raw_tensors, data_offset, size, path)
    return GGUFFile(
        path=path,
        version=version,
        byteorder="big" if p.endian == ">" else "little",
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
    )


def _read_tensor_info(p: _Parser, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = p.string(f"name of tensor {i}")
    n_dims = p.u32(f"dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"{p.path}: tensor {name!r} has {n_dims} dimensions; ggml supports at most {MAX_DIMS}")
    p.need(8 * n_dims, f"shape of tensor {name!r}")
    shape = struct.unpack_from(f"{p.endian}{n_dims}Q", p.buf, p.pos)
    p.pos += 8 * n_dims
    ggml_type = p.u32(f"type of tensor {name!r}")
    offset = p.u64(f"data offset of tensor {name!r}")
    return name, tuple(shape), ggml_type, offset


def _size_tensors(
    raw: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, file_size: int, path: Path
) -> list[TensorInfo]:
    """Attach byte sizes and check that every tensor's data lies inside the file.

    A partial download is the usual cause of a tensor running past the end; it
    is reported as truncation here rather than as a load failure in a runner.
    """
    data_size = file_size - data_offset
    known: dict[int, int] = {}
    for idx, (name, shape, ggml_type, offset) in enumerate(raw):
        t = GGML_TYPES.get(ggml_type)
        if t is None:
            continue
        ne0 = shape[0] if shape else 1
        if ne0 % t.block_size:
            raise GGUFError(
                f"{path}: tensor {name!r}: first dimension {ne0} is not a multiple of the "
                f"{t.name} block size {t.block_size}"
            )
        rows = 1
        for d in shape[1:]:
            rows *= d
        known[idx] = ne0 // t.block_size * t.type_size * rows

    # Unknown types: size = distance to the next tensor's data (or to the end).
    starts = sorted({offset for (_, _, _, offset) in raw} | {data_size})
    out: list[TensorInfo] = []
    for idx, (name, shape, ggml_type, offset) in enumerate(raw):
        nbytes = known.get(idx)
        if nbytes is None:
            nxt = next((s for s in starts if s > offset), data_size)
            nbytes = max(nxt - offset, 0)
        end = data_offset + offset + nbytes
        if end > file_size:
            raise GGUFError(
                f"{path}: truncated GGUF file: data of tensor {name!r} ({ggml_type_name(ggml_type)}, "
                f"{nbytes} bytes) ends at offset {end}, but the file is {file_size} bytes"
            )
        out.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    return out


def parse_bytes(data: bytes, path: str | Path = "<bytes>") -> GGUFFile:
    """Parse a GGUF image held in memory (tests, and headers fetched from elsewhere)."""
    data = bytes(data)
    return _parse(data, len(data), Path(path))


def _read_uncached(path: Path) -> GGUFFile:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFError(f"{path}: truncated GGUF file: the file is empty (reading the magic number)")
        # Only the header pages get touched; the tensor data is never read.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, size, path)


# ------------------------------------------------------------------ cache

_CACHE_SIZE = 64
_cache: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _cached(kind: str, path: Path, build: Any) -> Any:
    key = _cache_key(path)
    full = (kind, *key)
    with _cache_lock:
        hit = _cache.get(full)  # type: ignore[arg-type]
        if hit is not None:
            _cache.move_to_end(full)  # type: ignore[arg-type]
            return hit
    value = build()
    with _cache_lock:
        _cache[full] = value  # type: ignore[index]
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read a GGUF file's header.

    Cached by (resolved path, mtime, size), so asking again for an unchanged
    file costs one stat().  Raises GGUFError for malformed files and the usual
    OSError (FileNotFoundError, PermissionError) when the file cannot be opened.
    """
    p = Path(path)
    return _cached("gguf", p, lambda: _read_uncached(p))


# ------------------------------------------------------------------ summary


@dataclass(frozen=True)
class ModelInfo:
    """What the memory planner and the API need to know about a model file."""

    path: Path
    file_size: int
    architecture: str
    name: str | None
    file_type: int | None  # general.file_type (llama_ftype), if present
    quantization: str  # e.g. "Q4_K_M"; guessed from tensor types when file_type is absent
    parameter_count: int
    parameter_size: str  # e.g. "268M"
    context_length: int  # trained context
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int  # the largest per-layer value
    kv_heads_per_layer: tuple[int, ...]  # per layer; 0 for layers without attention
    key_length: int
    value_length: int
    feed_forward_length: int  # the largest per-layer value
    sliding_window: int | None
    vocab_size: int | None
    layer_bytes: tuple[int, ...]  # weights of blk.N.*, indexed by N
    non_layer_bytes: int  # token_embd, output, output_norm, ... as stored in the file
    output_bytes: int  # what llama.cpp puts on the output layer's device (see _output_bytes)
    output_tied: bool  # no output.weight: llama.cpp reuses token_embd for the output
    token_embd_bytes: int  # the input embeddings, which llama.cpp always keeps on the CPU
    weight_bytes: int  # all tensor data in the file
    has_vision: bool
    has_chat_template: bool

    @property
    def n_layers(self) -> int:
        return self.block_count


_BLK = re.compile(r"^blk\.(\d+)\.")


def _as_int(value: Any, default: int = 0) -> int:
    """Integer hyper-parameter; per-layer arrays give their maximum."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, list):
        ints = [_as_int(v, default) for v in value]
        return max(ints) if ints else default
    return default


def _per_layer(value: Any, default: int, n_layers: int) -> tuple[int, ...]:
    """A hyper-parameter that may be a scalar or a per-layer array, as one value per layer.

    Arrays too long to have been kept (ArrayInfo) fall back to `default`.
    """
    if isinstance(value, list) and value:
        vals = [_as_int(v, default) for v in value]
        if len(vals) < n_layers:
            vals += [vals[-1]] * (n_layers - len(vals))
        return tuple(vals[:n_layers])
    v = _as_int(value, default) if value is not None else default
    return (v,) * n_layers


def human_count(n: int) -> str:
    """Parameter counts the way model cards write them: 268M, 1.5B, 70.6B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            v = n / scale
            if suffix in ("T", "B"):
                return f"{v:.1f}{suffix}"
            return f"{v:.0f}{suffix}"
    return str(n)


def _quantization(gf: GGUFFile) -> tuple[int | None, str]:
    ft = gf.metadata.get("general.file_type")
    if isinstance(ft, int) and not isinstance(ft, bool):
        return ft, LLAMA_FTYPES.get(ft, f"UNKNOWN_{ft}")
    # No file_type: label by the type holding most bytes of the 2-D weights.
    by_type: Counter[int] = Counter()
    for t in gf.tensors:
        if len(t.shape) >= 2:
            by_type[t.ggml_type] += t.nbytes
    if not by_type:
        return None, "unknown"
    return None, ggml_type_name(by_type.most_common(1)[0][0])


def _output_bytes(by_name: dict[str, TensorInfo]) -> tuple[int, bool]:
    """Bytes of the output layer as llama.cpp places it.

    The output layer is output_norm + output.weight.  Models with tied
    embeddings have no output.weight; llama.cpp then creates the output from
    token_embd (TENSOR_DUPLICATED), so offloading the output layer copies the
    whole embedding matrix to the GPU while the input copy stays on the CPU.
    """
    norm = sum(t.nbytes for n, t in by_name.items() if n.startswith("output_norm."))
    out = by_name.get("output.weight")
    if out is not None:
        return norm + out.nbytes, False
    emb = by_name.get("token_embd.weight")
    return norm + (emb.nbytes if emb else 0), True


def _has_vision(gf: GGUFFile) -> bool:
    md = gf.metadata
    return bool(
        gf.architecture == "clip"
        or md.get("general.type") == "mmproj"
        or md.get("clip.has_vision_encoder") is True
    )


def model_info(gf: GGUFFile) -> ModelInfo:
    """Summarise a parsed header into the figures the memory planner uses."""
    arch = gf.architecture or "unknown"
    md = gf.metadata
    a = gf.arch_value

    embedding = _as_int(a("embedding_length"))
    head_count = _as_int(a("attention.head_count"))
    raw_kv = a("attention.head_count_kv")
    head_count_kv = _as_int(raw_kv, head_count) if raw_kv is not None else head_count
    default_head_dim = embedding // head_count if head_count else 0
    key_length = _as_int(a("attention.key_length")) or default_head_dim
    value_length = _as_int(a("attention.value_length")) or default_head_dim

    tensors = gf.tensors
    layer_count = _as_int(a("block_count"))
    per_layer: dict[int, int] = {}
    non_layer = 0
    for t in tensors:
        m = _BLK.match(t.name)
        if m:
            n = int(m.group(1))
            per_layer[n] = per_layer.get(n, 0) + t.nbytes
        else:
            non_layer += t.nbytes
    n_slots = max(layer_count, max(per_layer) + 1 if per_layer else 0)
    layer_bytes = tuple(per_layer.get(i, 0) for i in range(n_slots))
    by_name = {t.name: t for t in tensors}
    output_bytes, tied = _output_bytes(by_name)
    embd = by_name.get("token_embd.weight")

    tokens = md.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else None
    if vocab is None and a("vocab_size") is not None:
        vocab = _as_int(a("vocab_size"))

    file_type, quant = _quantization(gf)
    params = sum(t.n_elements for t in tensors)
    swa = a("attention.sliding_window")
    name = md.get("general.name")
    return ModelInfo(
        path=gf.path,
        file_size=gf.file_size,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=file_type,
        quantization=quant,
        parameter_count=params,
        parameter_size=human_count(params),
        context_length=_as_int(a("context_length")),
        block_count=layer_count or len(per_layer),
        embedding_length=embedding,
        head_count=head_count,
        head_count_kv=head_count_kv,
        kv_heads_per_layer=_per_layer(raw_kv, head_count, len(layer_bytes)),
        key_length=key_length,
        value_length=value_length,
        feed_forward_length=_as_int(a("feed_forward_length")),
        sliding_window=_as_int(swa) if swa is not None else None,
        vocab_size=vocab,
        layer_bytes=layer_bytes,
        non_layer_bytes=non_layer,
        output_bytes=output_bytes,
        output_tied=tied,
        token_embd_bytes=embd.nbytes if embd else 0,
        weight_bytes=sum(t.nbytes for t in tensors),
        has_vision=_has_vision(gf),
        has_chat_template=isinstance(md.get("tokenizer.chat_template"), str),
    )


def load_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """`model_info(read_gguf(path))`, cached on the same (path, mtime, size) key."""
    p = Path(path)
    return _cached("info", p, lambda: model_info(read_gguf(p)))


def type_mix(gf: GGUFFile) -> list[tuple[str, int]]:
    """(type name, total bytes) per ggml type, largest first: a quick quantization mix."""
    c: Counter[str] = Counter()
    for t in gf.tensors:
        c[t.type_name] += t.nbytes
    return c.most_common()
