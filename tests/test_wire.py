"""Header and ack codec: round trips, and every malformed input is a WireError with a clear message."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infscaled.errors import WireError
from infscaled.protocol import wire
from infscaled.protocol.wire import (
    ACK,
    ACK_BYTES,
    DATA,
    HEADER_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
    STOP,
    STOP_ACK,
    Ack,
    Header,
    MsgKind,
    TensorMeta,
    decode_ack,
    decode_header,
    encode_ack,
    encode_header,
)

NAME_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
SMALL_META = st.builds(
    TensorMeta,
    name=st.text(NAME_CHARS, min_size=1, max_size=16),
    dtype=st.sampled_from(sorted(wire.DTYPES)),
    shape=st.lists(st.integers(0, 16), max_size=MAX_NDIM).map(tuple),  # stays under MAX_TENSOR_BYTES
)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    metas = draw(st.lists(SMALL_META, max_size=MAX_TENSORS, unique_by=lambda m: m.name))
    return Header(draw(st.sampled_from(list(MsgKind))), draw(st.integers(0, 2**64 - 1)),
                  draw(st.integers(0, 2**64 - 1)), tuple(metas))


@given(headers())
def test_header_round_trip(header: Header) -> None:
    data = encode_header(header)
    assert len(data) == HEADER_BYTES
    assert decode_header(data) == header


@given(st.sampled_from(list(wire.AckKind)), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 1))
def test_ack_round_trip(kind: wire.AckKind, mb_id: int, samples: int, compute_us: int) -> None:
    ack = Ack(kind, mb_id, samples, compute_us)
    data = encode_ack(ack)
    assert len(data) == ACK_BYTES
    assert decode_ack(data) == ack


def test_known_layout() -> None:
    """The table in wire.py's docstring: fixed fields, then 44-byte descriptors with u32 dims."""
    data = encode_header(Header(DATA, 7, 9, (TensorMeta("hidden", "bfloat16", (2, 3)),)))
    assert data[:4] == b"INFS"
    assert struct.unpack_from("<HHQQHH", data, 4) == (1, 1, 7, 9, 1, 0)
    assert data[32:48] == b"hidden" + bytes(10)
    assert struct.unpack_from("<BB2x6I", data, 48) == (4, 2, 2, 3, 0, 0, 0, 0)
    assert data[76:] == bytes(HEADER_BYTES - 76)
    assert decode_header(data).tensors[0].nbytes == 12


def test_largest_dim_round_trips() -> None:
    metas = (TensorMeta("big", "uint8", (2**32 - 1,)), TensorMeta("z", "float64", (0, 2**32 - 1)))
    header = Header(DATA, 1, 0, metas)
    assert decode_header(encode_header(header)) == header


def test_scalar_and_empty_tensors() -> None:
    header = Header(STOP, 0, 0, (TensorMeta("s", "int64", ()), TensorMeta("e", "bool", (0, 5))))
    back = decode_header(encode_header(header))
    assert back == header and [t.nbytes for t in back.tensors] == [8, 0]


def _valid() -> bytearray:
    return bytearray(encode_header(Header(DATA, 1, 2, (TensorMeta("hidden", "float32", (4, 8)),))))


def _patch(fmt: str, offset: int, *values: object) -> bytes:
    data = _valid()
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


DESC = 32  # offset of the first descriptor


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_valid()[:-1], "header is 511 bytes, expected 512"),
        (b"", "header is 0 bytes"),
        (_patch("<4s", 0, b"JUNK"), "bad header magic b'JUNK'"),
        (_patch("<H", 4, 2), "unsupported header version 2"),
        (_patch("<H", 6, 9), "unknown message kind 9"),
        (_patch("<H", 24, 9), "announces 9 tensors, at most 8"),
        (_patch("<H", 26, 1), "unknown header flags"),
        (_patch("<B", 29, 1), "reserved bytes 28..31"),
        (_patch("<B", DESC + 16, 99), "unknown dtype code 99"),
        (_patch("<B", DESC + 17, 7), "ndim 7 exceeds 6"),
        (_patch("<I", DESC + 28, 5), "dims past ndim=2 are not zero"),
        (_patch("<16s", DESC, b""), "empty name"),
        (_patch("<16s", DESC, "hé".encode()), "not printable ASCII"),
        (_patch("<16s", DESC, b"a\0b"), "after its NUL terminator"),
        (_patch("<B", DESC + 18, 1), "descriptor 0: reserved bytes"),
        (_patch("<H", 24, 2), "descriptor 1: empty name"),  # announces a descriptor that is all zero
        (_patch("<B", 200, 1), "padding after 1 descriptors"),
        # 2^32-1 x 2^32-1 float32: far above MAX_TENSOR_BYTES, must not reach an allocation.
        (_patch("<2I", DESC + 20, 2**32 - 1, 2**32 - 1), "above MAX_TENSOR_BYTES"),
    ],
)
def test_malformed_header(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_header(data)


def test_duplicate_names_rejected_on_decode() -> None:
    metas = (TensorMeta("a", "uint8", (1,)), TensorMeta("b", "uint8", (1,)))
    data = bytearray(encode_header(Header(DATA, 1, 0, metas)))
    data[DESC + 44] = ord("a")
    with pytest.raises(WireError, match="duplicate tensor names"):
        decode_header(bytes(data))


def test_max_tensor_bytes_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _valid()  # float32 [4, 8] = 128 bytes
    monkeypatch.setattr(wire, "MAX_TENSOR_BYTES", 100)
    with pytest.raises(WireError, match="128 bytes, above MAX_TENSOR_BYTES=100"):
        decode_header(bytes(data))


def test_random_garbage_is_rejected() -> None:
    with pytest.raises(WireError, match="bad header magic"):
        decode_header(bytes(range(256)) * 2)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TensorMeta("a" * 17, "float32", (1,)), "17 bytes, at most 16"),
        (lambda: TensorMeta("", "float32", (1,)), "non-empty"),
        (lambda: TensorMeta("has space", "float32", (1,)), "printable ASCII"),
        (lambda: TensorMeta("x", "complex64", (1,)), "dtype 'complex64' unsupported"),
        (lambda: TensorMeta("x", "float32", (1,) * 7), "ndim 7 exceeds 6"),
        (lambda: TensorMeta("x", "float32", (2**32,)), "outside 0..4294967295"),
        (lambda: TensorMeta("x", "float32", (-1,)), "outside"),
        (lambda: TensorMeta("x", "float64", (2**31, 2**3)), "above MAX_TENSOR_BYTES"),
        (lambda: Header(99, 0), "unknown message kind 99"),
        (lambda: Header(DATA, -1), "mb_id -1 outside"),
        (lambda: Header(DATA, 0, 2**64), "route_key"),
        (lambda: Header(DATA, 0, 0, tuple(TensorMeta(f"t{i}", "uint8", ()) for i in range(9))), "9 tensors"),
        (lambda: Header(DATA, 0, 0, (TensorMeta("a", "uint8", ()),) * 2), "duplicate"),
        (lambda: Header(DATA, 0, 0, (), flags=4), "unknown header flags"),
        (lambda: Ack(5, 0), "unknown ack kind 5"),
        (lambda: Ack(ACK, 0, 2**32), "samples"),
    ],
)
def test_encode_side_validation(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=match):
        build()


_ACK1 = encode_ack(Ack(STOP_ACK, 1))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_ACK1[:31], "ack record is 31 bytes, expected 32"),
        (b"XXXX" + _ACK1[4:], "bad ack magic"),
        (_ACK1[:4] + b"\x09\x00" + _ACK1[6:], "unsupported ack version 9"),
        (_ACK1[:6] + b"\x07\x00" + _ACK1[8:], "unknown ack kind 7"),
        (_ACK1[:20] + b"\x01" + _ACK1[21:], "reserved"),
    ],
)
def test_malformed_ack(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_ack(data)


def test_wire_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, infscaled.protocol.wire; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
