"""The binary tensor body format (protocol/tensors.py) and its torch helpers (worker/service.py)."""

from __future__ import annotations

import struct

import pytest
import torch

from infscaled.errors import WireError
from infscaled.protocol import tensors, wire
from infscaled.protocol.tensors import HEADER_BYTES, TensorHeader, decode, encode, encode_header
from infscaled.worker.service import tensor_from_body, tensor_to_body


def test_header_is_small_fixed_and_little_endian() -> None:
    body = encode(TensorHeader("int64", (2, 3)), bytes(48))
    assert HEADER_BYTES == 32 and len(body) == 32 + 48
    assert body[:4] == b"INFT"
    assert struct.unpack_from("<HBB6I", body, 4) == (1, wire.DTYPES["int64"][0], 2, 2, 3, 0, 0, 0, 0)


def test_round_trip_of_raw_bytes() -> None:
    data = bytes(range(24))
    header, view = decode(encode(TensorHeader("float32", (3, 2)), data))
    assert header == TensorHeader("float32", (3, 2)) and bytes(view) == data


@pytest.mark.parametrize("t", [
    torch.randn(2, 5, 7),
    torch.randint(0, 512, (3, 9), dtype=torch.int64),
    torch.randn(4, 3).to(torch.bfloat16),
    torch.randn(2, 2).to(torch.float16),
    torch.tensor([True, False, True]),
    torch.tensor(3.5),  # a scalar: ndim 0
    torch.zeros((0, 4)),  # no data bytes at all
    torch.arange(24, dtype=torch.int32).reshape(2, 3, 4).transpose(0, 2),  # non-contiguous
])
def test_torch_round_trip(t: torch.Tensor) -> None:
    back = tensor_from_body(*decode(tensor_to_body(t)))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


def _raw(magic: bytes = b"INFT", version: int = 1, code: int = 1, ndim: int = 1,
         dims: tuple[int, ...] = (2, 0, 0, 0, 0, 0)) -> bytes:
    return struct.pack("<4sHBB6I", magic, version, code, ndim, *dims)


@pytest.mark.parametrize(("body", "message"), [
    (b"INFT", "shorter than its 32-byte header"),
    (_raw(magic=b"XXXX") + bytes(8), "bad tensor magic"),
    (_raw(version=2) + bytes(8), "unsupported tensor format version 2"),
    (_raw(code=99) + bytes(8), "unknown tensor dtype code 99"),
    (_raw(ndim=7) + bytes(8), "ndim 7 exceeds 6"),
    (_raw(dims=(2, 5, 0, 0, 0, 0)) + bytes(8), "dims past ndim=1 must be zero"),
    (_raw() + bytes(7), "needs 8 bytes of data after the header, got 7"),
    (_raw() + bytes(9), "needs 8 bytes of data after the header, got 9"),
    (_raw(ndim=3, dims=(65536, 65536, 65536, 0, 0, 0)), "above the limit"),
])
def test_malformed_bodies_are_rejected_with_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode(body)


def test_encode_checks_its_inputs() -> None:
    with pytest.raises(WireError, match="needs 8 bytes of data, got 4"):
        encode(TensorHeader("float32", (2,)), bytes(4))
    with pytest.raises(WireError, match="at most 6 allowed"):
        TensorHeader("float32", (1,) * 7)
    with pytest.raises(WireError, match="unsupported"):
        TensorHeader("complex64", (1,))
    assert len(encode_header(TensorHeader("uint8", ()))) == HEADER_BYTES
    assert tensors.CONTENT_TYPE == "application/x-infscaled-tensor"
