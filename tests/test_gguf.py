"""The GGUF reader: the real demo model, synthetic files of every shape, and broken files."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from hoshikage_sup import gguf
from hoshikage_sup.gguf import (
    GGML_TYPES,
    ArrayInfo,
    GGUFError,
    GGUFValueType as VT,
    ModelInfo,
    human_count,
    load_model_info,
    model_info,
    parse_bytes,
    read_gguf,
)

# ------------------------------------------------------------------ a writer for test files


def _enc_value(vtype: VT, value: Any, e: str) -> bytes:
    if vtype == VT.STRING:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack(e + "Q", len(raw)) + raw
    if vtype == VT.ARRAY:
        etype, items = value
        out = struct.pack(e + "IQ", etype, len(items))
        return out + b"".join(_enc_value(etype, v, e) for v in items)
    code = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
            VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}[vtype]
    return struct.pack(e + code, value)


def make_gguf(
    kvs: list[tuple[str, VT, Any]],
    tensors: list[tuple[str, tuple[int, ...], int]] = (),  # type: ignore[assignment]
    *,
    version: int = 3,
    big_endian: bool = False,
    alignment: int = 32,
    data_sizes: dict[str, int] | None = None,
) -> bytes:
    """A complete GGUF image: header, metadata, tensor infos, aligned tensor data.

    Tensor data sizes come from the ggml type table unless `data_sizes`
    gives one (used for types the reader does not know).
    """
    e = ">" if big_endian else "<"
    out = bytearray(b"GGUF" + struct.pack(e + "I", version) + struct.pack(e + "QQ", len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        out += _enc_value(VT.STRING, key, e) + struct.pack(e + "I", vtype) + _enc_value(vtype, value, e)
    offset = 0
    sizes = []
    for name, shape, ttype in tensors:
        if data_sizes and name in data_sizes:
            size = data_sizes[name]
        else:
            t = GGML_TYPES[ttype]
            n = 1
            for d in shape:
                n *= d
            size = n // t.block_size * t.type_size
        out += _enc_value(VT.STRING, name, e) + struct.pack(e + "I", len(shape))
        out += struct.pack(e + f"{len(shape)}Q", *shape) + struct.pack(e + "IQ", ttype, offset)
        sizes.append(size)
        offset += (size + alignment - 1) // alignment * alignment
    out += b"\0" * (-len(out) % alignment)
    for i, size in enumerate(sizes):
        out += bytes([i % 251]) * size
        if i < len(sizes) - 1:
            out += b"\0" * (-size % alignment)
    return bytes(out)


EVERY_TYPE: list[tuple[str, VT, Any]] = [
    ("t.u8", VT.UINT8, 200),
    ("t.i8", VT.INT8, -100),
    ("t.u16", VT.UINT16, 60000),
    ("t.i16", VT.INT16, -30000),
    ("t.u32", VT.UINT32, 4_000_000_000),
    ("t.i32", VT.INT32, -2_000_000_000),
    ("t.f32", VT.FLOAT32, 1.5),
    ("t.bool", VT.BOOL, True),
    ("t.str", VT.STRING, "héllo ☆"),
    ("t.u64", VT.UINT64, 2**63 + 5),
    ("t.i64", VT.INT64, -(2**62)),
    ("t.f64", VT.FLOAT64, 3.141592653589793),
    ("t.arr_i32", VT.ARRAY, (VT.INT32, [1, -2, 3])),
    ("t.arr_str", VT.ARRAY, (VT.STRING, ["a", "bc", ""])),
    ("t.arr_empty", VT.ARRAY, (VT.FLOAT32, [])),
    ("t.arr_nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.STRING, ["x"])])),
]

EXPECTED = {
    "t.u8": 200, "t.i8": -100, "t.u16": 60000, "t.i16": -30000, "t.u32": 4_000_000_000,
    "t.i32": -2_000_000_000, "t.f32": 1.5, "t.bool": True, "t.str": "héllo ☆", "t.u64": 2**63 + 5,
    "t.i64": -(2**62), "t.f64": 3.141592653589793, "t.arr_i32": [1, -2, 3], "t.arr_str": ["a", "bc", ""],
    "t.arr_empty": [], "t.arr_nested": [[1, 2], ["x"]],
}


def tiny_model(version: int = 3, **kw: Any) -> bytes:
    """A two-layer 'llama' with tied embeddings and a vocabulary long enough to be skipped."""
    kvs = [
        ("general.architecture", VT.STRING, "llama"),
        ("general.name", VT.STRING, "tiny"),
        ("general.file_type", VT.UINT32, 7),
        ("llama.context_length", VT.UINT32, 4096),
        ("llama.block_count", VT.UINT32, 2),
        ("llama.embedding_length", VT.UINT32, 32),
        ("llama.feed_forward_length", VT.UINT32, 64),
        ("llama.attention.head_count", VT.UINT32, 4),
        ("llama.attention.head_count_kv", VT.UINT32, 2),
        ("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(70)])),
        ("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.0] * 70)),
        ("tokenizer.chat_template", VT.STRING, "{{ messages }}"),
    ]
    tensors = [
        ("token_embd.weight", (32, 8), 8),  # Q8_0; fewer rows than tokens keeps the file small
        ("output_norm.weight", (32,), 0),
        ("blk.0.attn_q.weight", (32, 32), 8),
        ("blk.0.attn_norm.weight", (32,), 0),
        ("blk.1.attn_q.weight", (32, 32), 8),
        ("blk.1.ffn_up.weight", (256, 2), 12),  # Q4_K
    ]
    return make_gguf(kvs, tensors, version=version, **kw)


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------ the demo model


def test_demo_model_metadata(demo_model: Path) -> None:
    gf = read_gguf(demo_model)
    assert gf.version == 3
    assert gf.architecture == "gemma3"
    assert gf.arch_value("block_count") == 18
    assert gf.arch_value("attention.head_count_kv") == 1
    assert gf.arch_value("attention.key_length") == 256
    assert gf.metadata["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]
    assert gf.metadata["tokenizer.ggml.tokens"] == ArrayInfo(VT.STRING, 262144)
    assert gf.metadata["tokenizer.ggml.scores"] == ArrayInfo(VT.FLOAT32, 262144)
    assert gf.metadata["tokenizer.ggml.token_type"] == ArrayInfo(VT.INT32, 262144)
    assert gf.metadata["tokenizer.ggml.add_bos_token"] is True
    assert len(gf.tensors) == 236
    assert gf.file_size == demo_model.stat().st_size
    # Tensor data runs right up to the end of the file, aligned.
    end = max(gf.data_offset + t.offset + t.nbytes for t in gf.tensors)
    assert end == gf.file_size
    assert all(t.offset % gf.alignment == 0 for t in gf.tensors)
    embd = next(t for t in gf.tensors if t.name == "token_embd.weight")
    assert (embd.shape, embd.type_name, embd.nbytes) == ((640, 262144), "Q8_0", 178257920)


def test_demo_model_info(demo_model: Path) -> None:
    info = load_model_info(demo_model)
    assert isinstance(info, ModelInfo)
    assert info.architecture == "gemma3"
    assert info.name == "Gemma 3 270m"
    assert (info.file_type, info.quantization) == (15, "Q4_K_M")
    assert info.parameter_count == 268_098_176
    assert info.parameter_size == "268M"
    assert info.context_length == 32768
    assert info.block_count == 18
    assert (info.embedding_length, info.head_count, info.head_count_kv) == (640, 4, 1)
    assert (info.key_length, info.value_length) == (256, 256)
    assert info.kv_heads_per_layer == (1,) * 18
    assert info.sliding_window == 512
    assert info.vocab_size == 262144
    assert len(info.layer_bytes) == 18
    assert sum(info.layer_bytes) + info.non_layer_bytes == info.weight_bytes
    assert info.output_tied  # Gemma ties the output to token_embd
    assert info.token_embd_bytes == 178257920
    assert info.output_bytes == 178257920 + 640 * 4  # token_embd copy + output_norm
    assert not info.has_vision
    assert info.has_chat_template is False  # this GGUF ships without a template
    # Cached: the second call costs nothing and returns the same object.
    assert load_model_info(demo_model) is info


# ------------------------------------------------------------------ synthetic files


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("big_endian", [False, True])
def test_every_value_type(version: int, big_endian: bool) -> None:
    gf = parse_bytes(make_gguf(EVERY_TYPE, version=version, big_endian=big_endian))
    assert gf.version == version
    assert gf.byteorder == ("big" if big_endian else "little")
    assert gf.metadata == EXPECTED
    assert gf.tensors == []


def test_large_arrays_are_skipped_not_materialised() -> None:
    n = gguf.MAX_SMALL_ARRAY
    kvs = [
        ("small_str", VT.ARRAY, (VT.STRING, ["s"] * n)),
        ("big_str", VT.ARRAY, (VT.STRING, [f"w{i}" * (i % 7) for i in range(5000)])),
        ("numeric_kept", VT.ARRAY, (VT.INT32, list(range(gguf.MAX_NUMERIC_ARRAY)))),
        ("big_f32", VT.ARRAY, (VT.FLOAT32, [0.5] * (gguf.MAX_NUMERIC_ARRAY + 1))),
        ("big_nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [i % 256]) for i in range(n + 1)])),
        ("after", VT.STRING, "still read correctly"),
    ]
    md = parse_bytes(make_gguf(kvs)).metadata
    assert md["small_str"] == ["s"] * n
    assert md["big_str"] == ArrayInfo(VT.STRING, 5000)
    assert md["numeric_kept"] == list(range(gguf.MAX_NUMERIC_ARRAY))
    assert md["big_f32"] == ArrayInfo(VT.FLOAT32, gguf.MAX_NUMERIC_ARRAY + 1)
    assert md["big_nested"] == ArrayInfo(VT.ARRAY, n + 1)
    assert md["after"] == "still read correctly"


def test_tensor_infos_and_sizes(tmp_path: Path) -> None:
    gf = read_gguf(write(tmp_path, tiny_model()))
    sizes = {t.name: t.nbytes for t in gf.tensors}
    assert sizes == {
        "token_embd.weight": 8 * 34,
        "output_norm.weight": 32 * 4,
        "blk.0.attn_q.weight": 32 * 34,
        "blk.0.attn_norm.weight": 32 * 4,
        "blk.1.attn_q.weight": 32 * 34,
        "blk.1.ffn_up.weight": 2 * 144,
    }
    assert gf.data_offset % 32 == 0
    assert [t.shape for t in gf.tensors][:2] == [(32, 8), (32,)]
    assert gf.metadata["tokenizer.ggml.tokens"] == ArrayInfo(VT.STRING, 70)
    assert gf.metadata["tokenizer.ggml.scores"] == [0.0] * 70


@pytest.mark.parametrize(
    ("name", "block", "size"),
    [("F32", 1, 4), ("F16", 1, 2), ("BF16", 1, 2), ("Q4_0", 32, 18), ("Q4_1", 32, 20), ("Q5_0", 32, 22),
     ("Q5_1", 32, 24), ("Q8_0", 32, 34), ("Q8_1", 32, 40), ("Q2_K", 256, 84), ("Q3_K", 256, 110),
     ("Q4_K", 256, 144), ("Q5_K", 256, 176), ("Q6_K", 256, 210), ("Q8_K", 256, 292), ("IQ2_XXS", 256, 66),
     ("IQ2_XS", 256, 74), ("IQ2_S", 256, 82), ("IQ3_XXS", 256, 98), ("IQ3_S", 256, 110), ("IQ1_S", 256, 50),
     ("IQ1_M", 256, 56), ("IQ4_NL", 32, 18), ("IQ4_XS", 256, 136), ("TQ1_0", 256, 54), ("TQ2_0", 256, 66),
     ("I8", 1, 1), ("I16", 1, 2), ("I32", 1, 4), ("I64", 1, 8), ("F64", 1, 8), ("MXFP4", 32, 17)],
)
def test_ggml_type_table(name: str, block: int, size: int) -> None:
    """Spot values from ggml's type_traits (block size, bytes per block)."""
    t = next(t for t in GGML_TYPES.values() if t.name == name)
    assert (t.block_size, t.type_size) == (block, size)


def test_unknown_tensor_type_is_sized_by_offsets() -> None:
    data = make_gguf(
        [("general.architecture", VT.STRING, "x")],
        [("a", (64,), 99), ("b", (16,), 0)],
        data_sizes={"a": 100},
    )
    gf = parse_bytes(data)
    a, b = gf.tensors
    assert a.type_name == "UNKNOWN_99"
    assert a.nbytes == 128  # up to b, which starts at the next 32-byte boundary
    assert b.nbytes == 64


def test_model_info_of_tiny_model(tmp_path: Path) -> None:
    info = model_info(read_gguf(write(tmp_path, tiny_model())))
    assert info.architecture == "llama"
    assert info.quantization == "Q8_0"
    assert info.block_count == 2
    assert info.vocab_size == 70
    assert (info.head_count, info.head_count_kv) == (4, 2)
    assert (info.key_length, info.value_length) == (8, 8)  # embedding / heads when absent
    assert info.layer_bytes == (32 * 34 + 128, 32 * 34 + 2 * 144)
    assert info.output_tied
    assert info.output_bytes == 8 * 34 + 128
    assert info.has_chat_template
    assert info.parameter_count == 32 * 8 + 32 + 32 * 32 + 32 + 32 * 32 + 256 * 2


def test_per_layer_head_count_kv_takes_the_max() -> None:
    kvs = [
        ("general.architecture", VT.STRING, "openelm"),
        ("openelm.block_count", VT.UINT32, 4),
        ("openelm.embedding_length", VT.UINT32, 256),
        ("openelm.attention.head_count", VT.ARRAY, (VT.INT32, [8, 8, 12, 16])),
        ("openelm.attention.head_count_kv", VT.ARRAY, (VT.INT32, [2, 3, 0, 4])),
    ]
    info = model_info(parse_bytes(make_gguf(kvs)))
    assert info.head_count == 16
    assert info.head_count_kv == 4
    assert info.kv_heads_per_layer == (2, 3, 0, 4)
    assert info.key_length == 16


def test_missing_file_type_guesses_from_tensors() -> None:
    kvs = [("general.architecture", VT.STRING, "llama")]
    tensors = [("a.weight", (256, 4), 12), ("b.weight", (32, 2), 8), ("n", (256,), 0)]
    info = model_info(parse_bytes(make_gguf(kvs, tensors)))
    assert (info.file_type, info.quantization) == (None, "Q4_K")


def test_human_count() -> None:
    assert human_count(268_098_176) == "268M"
    assert human_count(1_543_714_304) == "1.5B"
    assert human_count(70_553_706_496) == "70.6B"
    assert human_count(999) == "999"


# ------------------------------------------------------------------ broken files


def test_bad_magic_says_what_it_found(tmp_path: Path) -> None:
    path = write(tmp_path, b"PK\x03\x04 this is a zip" + b"\0" * 64)
    with pytest.raises(GGUFError, match=r"not a GGUF file.*b'PK\\x03\\x04'"):
        read_gguf(path)


def test_version_1_is_refused() -> None:
    data = bytearray(make_gguf(EVERY_TYPE))
    data[4:8] = struct.pack("<I", 1)
    with pytest.raises(GGUFError, match="unsupported GGUF version 1"):
        parse_bytes(bytes(data))


def test_future_version_is_refused() -> None:
    data = bytearray(make_gguf(EVERY_TYPE))
    data[4:8] = struct.pack("<I", 4)
    with pytest.raises(GGUFError, match="unsupported GGUF version 4.*2, 3"):
        parse_bytes(bytes(data))


def test_unknown_value_type_names_the_key() -> None:
    data = make_gguf([("good", VT.UINT8, 1), ("bad.key", VT.UINT8, 7)])
    at = data.index(b"bad.key") + len(b"bad.key")  # its value type follows the key
    patched = data[:at] + struct.pack("<I", 13) + data[at + 4 :]
    with pytest.raises(GGUFError, match=r"unknown GGUF value type 13 for key 'bad.key' at offset"):
        parse_bytes(patched)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="empty"):
        read_gguf(write(tmp_path, b""))


@pytest.mark.parametrize("version", [2, 3])
def test_truncated_at_every_cut_point(version: int) -> None:
    data = tiny_model(version)
    for cut in range(len(data)):
        with pytest.raises(GGUFError):
            parse_bytes(data[:cut])
    parse_bytes(data)  # the whole file is fine


def test_truncation_message_says_where(tmp_path: Path) -> None:
    data = tiny_model()
    with pytest.raises(GGUFError, match=r"truncated GGUF file: needed \d+ byte\(s\) at offset \d+ reading"):
        read_gguf(write(tmp_path, data[:700]))
    with pytest.raises(GGUFError, match=r"data of tensor 'blk.1.ffn_up.weight'.*ends at offset"):
        read_gguf(write(tmp_path, data[:-1], "short.gguf"))


def test_truncated_inside_a_skipped_string_array() -> None:
    kvs = [("big", VT.ARRAY, (VT.STRING, ["token"] * 500))]
    data = make_gguf(kvs)
    with pytest.raises(GGUFError, match=r"reading length of element \d+ of the array in key 'big'"):
        parse_bytes(data[: len(data) // 2])


def test_corrupt_bytes_raise_only_gguf_errors() -> None:
    """Overwrite each header byte with extreme values: the reader either copes or raises GGUFError."""
    data = tiny_model()
    header = gguf.parse_bytes(data).data_offset
    for i in range(header):
        for b in (0x00, 0x7F, 0xFF):
            mutated = data[:i] + bytes([b]) + data[i + 1 :]
            try:
                parse_bytes(mutated)
            except GGUFError:
                pass


def test_absurd_counts_are_rejected_up_front() -> None:
    data = bytearray(make_gguf(EVERY_TYPE))
    data[16:24] = struct.pack("<Q", 2**60)  # kv count
    with pytest.raises(GGUFError, match="cannot fit"):
        parse_bytes(bytes(data))


# ------------------------------------------------------------------ cache


def test_cache_follows_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path, make_gguf([("k", VT.UINT32, 1)]))
    first = read_gguf(path)
    assert read_gguf(path) is first
    path.write_bytes(make_gguf([("k", VT.UINT32, 2), ("extra", VT.UINT8, 0)]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = read_gguf(path)
    assert second is not first
    assert second.metadata["k"] == 2


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nope.gguf")
