"""The generation plane's typed messages as wire messages (protocol/generation.py is the contract).

`encode(msg, mb_id)` and `decode(wire)` are the only places that know tensor names; everything
else handles `Prefill`, `Decode`, `Tokens` and `Free` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infscaled.errors import WireError
from infscaled.protocol import generation as g
from infscaled.protocol.wire import MsgKind
from infscaled.worker.transport import Message


@dataclass
class Prefill:
    specs: list[g.SequenceSpec]
    x: torch.Tensor  # input_ids [n, T] int64 (right-padded) into stage 0; hidden [n, T, D] further down
    attention_mask: torch.Tensor  # [n, T] int64
    free: list[int] = field(default_factory=list)

    @property
    def seqs(self) -> list[int]:
        return [s.seq for s in self.specs]


@dataclass
class Decode:
    seqs: list[int]
    x: torch.Tensor  # next input ids [n, 1] into stage 0; hidden [n, 1, D] further down
    free: list[int] = field(default_factory=list)


@dataclass
class Tokens:
    seqs: list[int]
    tokens: list[int]
    done: list[bool]


@dataclass
class Free:
    free: list[int]


GenMessage = Prefill | Decode | Tokens | Free


def table(seqs: list[int]) -> torch.Tensor:
    """The request table of a generation message: [n, 2] (sequence id, one row each)."""
    return torch.tensor([[s, 1] for s in seqs], dtype=torch.int64).reshape(-1, 2)


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def encode(msg: GenMessage, mb_id: int) -> Message:
    if isinstance(msg, Prefill):
        specs = torch.frombuffer(bytearray(g.encode_specs(msg.specs)), dtype=torch.uint8)
        tensors = {g.REQUESTS: table(msg.seqs), g.X: msg.x, g.MASK: msg.attention_mask, g.SPECS: specs}
        if msg.free:
            tensors[g.FREE_IDS] = _ids(msg.free)
        route = msg.specs[0].seq if msg.specs else 0
        return Message(MsgKind.PREFILL, mb_id, route, tensors)
    if isinstance(msg, Decode):
        tensors = {g.REQUESTS: table(msg.seqs), g.X: msg.x}
        if msg.free:
            tensors[g.FREE_IDS] = _ids(msg.free)
        return Message(MsgKind.DECODE, mb_id, 0, tensors)
    if isinstance(msg, Tokens):
        return Message(MsgKind.TOKENS, mb_id, 0, {g.REQUESTS: table(msg.seqs), g.TOKENS: _ids(msg.tokens),
                                                  g.DONE: _ids([int(d) for d in msg.done])})
    return Message(MsgKind.FREE, mb_id, 0, {g.REQUESTS: table([]), g.FREE_IDS: _ids(msg.free)})


def decode(wire: Message) -> GenMessage:
    """The typed message a wire message carries; WireError when a field is missing or inconsistent."""
    t = wire.tensors
    try:
        seqs = [int(s) for s in t[g.REQUESTS][:, 0].tolist()]
        free = [int(s) for s in t[g.FREE_IDS].tolist()] if g.FREE_IDS in t else []
        if wire.kind == MsgKind.PREFILL:
            specs = g.decode_specs(t[g.SPECS].numpy().tobytes())
            if [s.seq for s in specs] != seqs:
                raise WireError(f"prefill specs name sequences {[s.seq for s in specs]}, its table {seqs}")
            return Prefill(specs, t[g.X], t[g.MASK], free)
        if wire.kind == MsgKind.DECODE:
            return Decode(seqs, t[g.X], free)
        if wire.kind == MsgKind.TOKENS:
            tokens, done = t[g.TOKENS].tolist(), t[g.DONE].tolist()
            if not len(tokens) == len(done) == len(seqs):
                raise WireError(f"tokens message: {len(seqs)} sequences, {len(tokens)} tokens, {len(done)} done flags")
            return Tokens(seqs, [int(x) for x in tokens], [bool(d) for d in done])
        if wire.kind == MsgKind.FREE:
            return Free(free)
    except KeyError as exc:
        raise WireError(f"{MsgKind(wire.kind).name} message without its {exc} tensor") from None
    raise WireError(f"a generation stage got a {MsgKind(wire.kind).name} message")
