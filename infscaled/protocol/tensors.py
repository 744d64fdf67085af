"""One tensor over HTTP: the `application/x-infscaled-tensor` body format (struct only, no torch).

A body is a fixed HEADER_BYTES header followed by the tensor's raw bytes, C order,
little-endian, exactly numel * itemsize of them. All integers are little-endian.

    offset  size  field       notes
    0       4     magic       b"INFT"
    4       2     version     u16, = VERSION (1)
    6       1     dtype       u8 code, the data plane's codes (protocol/wire.py DTYPES)
    7       1     ndim        u8, <= MAX_NDIM (6); 0 is a scalar
    8       24    dims        6 x u32; dims past ndim are zero

Decoding validates every field and the payload length and raises WireError naming what is
wrong, so a malformed body is a clear 400, never a giant allocation.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from infscaled.errors import WireError
from infscaled.protocol import wire
from infscaled.protocol.wire import DTYPE_CODES, DTYPES, MAX_NDIM

CONTENT_TYPE = "application/x-infscaled-tensor"
MAGIC = b"INFT"
VERSION = 1
_HEADER = struct.Struct(f"<4sHBB{MAX_NDIM}I")
HEADER_BYTES = _HEADER.size
assert HEADER_BYTES == 32
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class TensorHeader:
    """A tensor's dtype name (a key of wire.DTYPES) and shape."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise WireError(f"tensor dtype {self.dtype!r} unsupported; allowed: {', '.join(DTYPES)}")
        shape = tuple(int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) > MAX_NDIM:
            raise WireError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
        if any(not 0 <= d <= _U32 for d in shape):
            raise WireError(f"tensor shape {list(shape)}: every dim must be in 0..{_U32}")
        if self.nbytes > wire.MAX_TENSOR_BYTES:  # read at call time, like the data plane's limit
            raise WireError(f"tensor {self.dtype}{list(shape)} is {self.nbytes} bytes, "
                            f"above the limit of {wire.MAX_TENSOR_BYTES}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def encode_header(header: TensorHeader) -> bytes:
    dims = list(header.shape) + [0] * (MAX_NDIM - len(header.shape))
    return _HEADER.pack(MAGIC, VERSION, DTYPES[header.dtype][0], len(header.shape), *dims)


def encode(header: TensorHeader, data: bytes | bytearray | memoryview) -> bytes:
    """Header + raw bytes; `data` must hold exactly header.nbytes bytes (little-endian, C order)."""
    if len(memoryview(data).cast("B")) != header.nbytes:
        raise WireError(f"tensor {header.dtype}{list(header.shape)} needs {header.nbytes} bytes of data, "
                        f"got {len(memoryview(data).cast('B'))}")
    return encode_header(header) + bytes(data)


def decode(body: bytes | bytearray | memoryview) -> tuple[TensorHeader, memoryview]:
    """Parse and validate a body; returns its header and a view of exactly its data bytes."""
    view = memoryview(body).cast("B")
    if len(view) < HEADER_BYTES:
        raise WireError(f"tensor body is {len(view)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, code, ndim, *dims = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"bad tensor magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported tensor format version {version}, this build speaks {VERSION}")
    if code not in DTYPE_CODES:
        raise WireError(f"unknown tensor dtype code {code}; known: "
                        + ", ".join(f"{c}={n}" for c, n in sorted(DTYPE_CODES.items())))
    if ndim > MAX_NDIM:
        raise WireError(f"tensor ndim {ndim} exceeds {MAX_NDIM}")
    if any(dims[ndim:]):
        raise WireError(f"tensor dims past ndim={ndim} must be zero, got {dims}")
    header = TensorHeader(DTYPE_CODES[code], tuple(dims[:ndim]))
    data = view[HEADER_BYTES:]
    if len(data) != header.nbytes:
        raise WireError(f"tensor {header.dtype}{list(header.shape)} needs {header.nbytes} bytes of data "
                        f"after the header, got {len(data)}")
    return header, data
