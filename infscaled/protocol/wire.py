"""Data-plane wire format: fixed-size message headers and ack records (struct only, no torch).

A message on an edge is one header of HEADER_BYTES, then each tensor's raw bytes as its own
send, in descriptor order (tensors of 0 bytes are not sent). All integers are little-endian.

Header (HEADER_BYTES = 512):

    offset  size  field       notes
    0       4     magic       b"INFS"
    4       2     version     u16, = VERSION (1)
    6       2     kind        u16: DATA=1, STOP=2, ERROR=3; generation: PREFILL=4, DECODE=5,
                              TOKENS=6, FREE=7 (protocol/generation.py says what each carries)
    8       8     mb_id       u64, micro-batch id
    16      8     route_key   u64, sticky-routing key (e.g. request id); 0 when unused
    24      2     n_tensors   u16, <= MAX_TENSORS (8)
    26      2     flags       u16, no bit is defined yet: must be 0
    28      4     reserved    zero
    32      44*n  descriptors n_tensors x TensorMeta descriptor, below
    ...           padding     zero up to 512 (decode checks it is zero)

Tensor descriptor (44 bytes):

    offset  size  field       notes
    0       16    name        ASCII, printable, no spaces, NUL-padded; 1..16 bytes
    16      1     dtype       u8 code, see DTYPE_CODES
    17      1     ndim        u8, <= MAX_NDIM (6); 0 is a scalar
    18      1     reserved    zero
    19      1     flags       u8: bit 0 HOST (the tensor travels on the header channel, e.g. gloo,
                              even on an edge whose data channel is NCCL); other bits zero
    20      24    dims        6 x u32; dims past ndim are zero

Dims are u32, not u64: eight descriptors with six u64 dims and 16-byte names do not fit in
512 bytes, and every tensor is bounded by MAX_TENSOR_BYTES anyway.

Ack record (ACK_BYTES = 32), sent back dst -> src after the receiver computed a micro-batch:

    offset  size  field       notes
    0       4     magic       b"INFA"
    4       2     version     u16, = VERSION
    6       2     kind        u16: ACK=1, STOP_ACK=2
    8       8     mb_id       u64
    16      4     samples     u32, samples in the micro-batch
    20      4     reserved    zero
    24      8     compute_us  u64, receiver's compute time in microseconds

Decoding validates every field and raises WireError naming it, so a malformed header fails
fast instead of hanging the edge or allocating a giant tensor.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field

from infscaled.errors import WireError

VERSION = 1
HEADER_BYTES = 512
ACK_BYTES = 32
MAX_TENSORS = 8
MAX_NDIM = 6
NAME_BYTES = 16
# Largest single tensor a header may announce; read at validation time so it can be changed.
MAX_TENSOR_BYTES = 8 << 30

HEADER_MAGIC = b"INFS"
ACK_MAGIC = b"INFA"
KNOWN_FLAGS = 0

_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

_FIXED = struct.Struct("<4sHHQQHH4x")  # 32 bytes
_DESC = struct.Struct(f"<{NAME_BYTES}sBBxB{MAX_NDIM}I")  # 44 bytes
DESC_HOST = 0x01  # descriptor flag: the tensor rides the header channel
_ACK = struct.Struct("<4sHHQI4xQ")  # 32 bytes
assert _FIXED.size == 32 and _DESC.size == 44 and _ACK.size == ACK_BYTES
assert _FIXED.size + MAX_TENSORS * _DESC.size <= HEADER_BYTES


class MsgKind(enum.IntEnum):
    DATA = 1  # a forward micro-batch
    STOP = 2  # the sender will send nothing more on this edge
    ERROR = 3  # reserved for a future failure report
    # The generation plane (protocol/generation.py): the kind says what a message is, so no
    # receiver ever guesses it from the tensor names it happens to carry.
    PREFILL = 4
    DECODE = 5
    TOKENS = 6
    FREE = 7


class AckKind(enum.IntEnum):
    ACK = 1
    STOP_ACK = 2


DATA, STOP, ERROR = MsgKind.DATA, MsgKind.STOP, MsgKind.ERROR
ACK, STOP_ACK = AckKind.ACK, AckKind.STOP_ACK


# name -> (code, itemsize). Codes are part of the wire format: never renumber.
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4),
    "float64": (2, 8),
    "float16": (3, 2),
    "bfloat16": (4, 2),
    "int64": (5, 8),
    "int32": (6, 4),
    "uint8": (7, 1),
    "bool": (8, 1),
}
DTYPE_CODES: dict[int, str] = {code: name for name, (code, _) in DTYPES.items()}
_MSG_KINDS = frozenset(int(k) for k in MsgKind)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor name must be a non-empty string, got {name!r}")
    if not all(0x21 <= ord(c) <= 0x7E for c in name):
        raise WireError(f"tensor name {name!r} must be printable ASCII without spaces")
    if len(name) > NAME_BYTES:
        raise WireError(f"tensor name {name!r} is {len(name)} bytes, at most {NAME_BYTES} allowed")


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype name (a key of DTYPES) and shape of one tensor in a message.

    `host`: the tensor travels on the edge's header channel (host memory, gloo) even where the
    data channel moves device memory (NCCL): small host-side tables such as the request table.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    host: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.dtype not in DTYPES:
            raise WireError(f"tensor {self.name!r}: dtype {self.dtype!r} unsupported, "
                            f"allowed: {sorted(DTYPES)}")
        shape = tuple(int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) > MAX_NDIM:
            raise WireError(f"tensor {self.name!r}: ndim {len(shape)} exceeds {MAX_NDIM}")
        for d in shape:
            if not 0 <= d <= _U32:
                raise WireError(f"tensor {self.name!r}: dim {d} in shape {shape} outside 0..{_U32}")
        if self.nbytes > MAX_TENSOR_BYTES:
            raise WireError(
                f"tensor {self.name!r}: {self.dtype}{list(shape)} is {self.nbytes} bytes, "
                f"above MAX_TENSOR_BYTES={MAX_TENSOR_BYTES}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Header:
    """What precedes a message's tensors: its kind, ids and tensor descriptors in wire order."""

    kind: MsgKind
    mb_id: int
    route_key: int = 0
    tensors: tuple[TensorMeta, ...] = field(default=())
    flags: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", MsgKind(self.kind))
        except ValueError:
            raise WireError(f"unknown message kind {self.kind}, allowed: {sorted(_MSG_KINDS)}") from None
        for fname, value, hi in (("mb_id", self.mb_id, _U64), ("route_key", self.route_key, _U64)):
            if not 0 <= value <= hi:
                raise WireError(f"{fname} {value} outside 0..{hi}")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if len(self.tensors) > MAX_TENSORS:
            raise WireError(f"{len(self.tensors)} tensors in one message, at most {MAX_TENSORS} allowed")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise WireError(f"duplicate tensor names in {names}")
        if not 0 <= self.flags <= _U16 or self.flags & ~KNOWN_FLAGS:
            raise WireError(f"unknown header flags {self.flags:#06x} (known: {KNOWN_FLAGS:#06x})")


@dataclass(frozen=True)
class Ack:
    """Receiver -> sender: micro-batch `mb_id` of `samples` samples was computed in `compute_us`."""

    kind: AckKind
    mb_id: int
    samples: int = 0
    compute_us: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", AckKind(self.kind))
        except ValueError:
            raise WireError(f"unknown ack kind {self.kind}, allowed: {[int(k) for k in AckKind]}") from None
        for fname, value, hi in (("mb_id", self.mb_id, _U64), ("samples", self.samples, _U32),
                                 ("compute_us", self.compute_us, _U64)):
            if not 0 <= value <= hi:
                raise WireError(f"ack {fname} {value} outside 0..{hi}")


def encode_header(header: Header) -> bytes:
    """Pack a (validated) header into exactly HEADER_BYTES bytes."""
    out = bytearray(HEADER_BYTES)
    _FIXED.pack_into(out, 0, HEADER_MAGIC, VERSION, header.kind, header.mb_id, header.route_key,
                     len(header.tensors), header.flags)
    for i, meta in enumerate(header.tensors):
        dims = list(meta.shape) + [0] * (MAX_NDIM - len(meta.shape))
        _DESC.pack_into(out, _FIXED.size + i * _DESC.size, meta.name.encode("ascii"),
                        DTYPES[meta.dtype][0], len(meta.shape), DESC_HOST if meta.host else 0, *dims)
    return bytes(out)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate a header; raises WireError naming the first bad field."""
    data = bytes(data)
    if len(data) != HEADER_BYTES:
        raise WireError(f"header is {len(data)} bytes, expected {HEADER_BYTES}")
    magic, version, kind, mb_id, route_key, n_tensors, flags = _FIXED.unpack_from(data, 0)
    if magic != HEADER_MAGIC:
        raise WireError(f"bad header magic {magic!r}, expected {HEADER_MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported header version {version}, this build speaks {VERSION}")
    if kind not in _MSG_KINDS:
        raise WireError(f"unknown message kind {kind}, allowed: {sorted(_MSG_KINDS)}")
    if n_tensors > MAX_TENSORS:
        raise WireError(f"header announces {n_tensors} tensors, at most {MAX_TENSORS} allowed")
    if data[28:32] != bytes(4):
        raise WireError("header reserved bytes 28..31 are not zero")
    end = _FIXED.size + n_tensors * _DESC.size
    if data[end:] != bytes(HEADER_BYTES - end):
        raise WireError(f"header padding after {n_tensors} descriptors (bytes {end}..) is not zero")
    metas = [_decode_desc(data, i) for i in range(n_tensors)]
    try:
        return Header(MsgKind(kind), mb_id, route_key, tuple(metas), flags)
    except WireError as e:
        raise WireError(f"header: {e}") from None


def _decode_desc(data: bytes, i: int) -> TensorMeta:
    off = _FIXED.size + i * _DESC.size
    if data[off + 18] != 0:
        raise WireError(f"tensor descriptor {i}: reserved bytes are not zero")
    raw_name, code, ndim, dflags, *dims = _DESC.unpack_from(data, off)
    if dflags & ~DESC_HOST:
        raise WireError(f"tensor descriptor {i}: unknown flags {dflags:#04x} (known: {DESC_HOST:#04x})")
    name_bytes, _, rest = raw_name.partition(b"\0")
    if rest.strip(b"\0"):
        raise WireError(f"tensor descriptor {i}: name {raw_name!r} has bytes after its NUL terminator")
    if not name_bytes:
        raise WireError(f"tensor descriptor {i}: empty name")
    if not all(0x21 <= b <= 0x7E for b in name_bytes):
        raise WireError(f"tensor descriptor {i}: name {name_bytes!r} is not printable ASCII")
    name = name_bytes.decode("ascii")
    if code not in DTYPE_CODES:
        raise WireError(f"tensor {name!r}: unknown dtype code {code}, known: {sorted(DTYPE_CODES)}")
    if ndim > MAX_NDIM:
        raise WireError(f"tensor {name!r}: ndim {ndim} exceeds {MAX_NDIM}")
    if any(dims[ndim:]):
        raise WireError(f"tensor {name!r}: dims past ndim={ndim} are not zero: {dims}")
    try:
        return TensorMeta(name, DTYPE_CODES[code], tuple(dims[:ndim]), bool(dflags & DESC_HOST))
    except WireError as e:
        raise WireError(f"tensor descriptor {i}: {e}") from None


def encode_ack(ack: Ack) -> bytes:
    return _ACK.pack(ACK_MAGIC, VERSION, ack.kind, ack.mb_id, ack.samples, ack.compute_us)


def decode_ack(data: bytes | bytearray | memoryview) -> Ack:
    """Parse and validate an ack record; raises WireError naming the bad field."""
    data = bytes(data)
    if len(data) != ACK_BYTES:
        raise WireError(f"ack record is {len(data)} bytes, expected {ACK_BYTES}")
    magic, version, kind, mb_id, samples, compute_us = _ACK.unpack(data)
    if magic != ACK_MAGIC:
        raise WireError(f"bad ack magic {magic!r}, expected {ACK_MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported ack version {version}, this build speaks {VERSION}")
    if data[20:24] != bytes(4):
        raise WireError("ack reserved bytes 20..23 are not zero")
    return Ack(kind, mb_id, samples, compute_us)  # validates kind
