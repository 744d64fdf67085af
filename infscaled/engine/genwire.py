"""The generation plane's typed messages as wire messages (protocol/generation.py is the contract).

`encode(msg, mb_id)` and `decode(wire)` are the only places that know tensor names; everything
else handles `Prefill`, `Decode`, `Tokens` and `Free` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from infscaled.errors import WireError
from infscaled.generation.params import PromptLogprobs, Sampled
from infscaled.generation.sampling_wire import LOGPROB_KEYS, reported_at, token_tensors
from infscaled.protocol import generation as g
from infscaled.protocol.wire import MsgKind
from infscaled.worker.transport import Message

X_KEY = g.X  # the activations' tensor: the only one a CUDA stage stages onto its device (engine/cuda.py)


@dataclass
class Prefill:
    specs: list[g.SequenceSpec]
    x: torch.Tensor  # input_ids [n, T] int64 (right-padded) into stage 0; hidden [n, T, D] further down
    attention_mask: torch.Tensor  # [n, T] int64
    free: list[int] = field(default_factory=list)
    # Per row, positions cached before this chunk (chunked prefill); empty: every row starts at 0.
    starts: list[int] = field(default_factory=list)

    @property
    def seqs(self) -> list[int]:
        return [s.seq for s in self.specs]

    @cached_property
    def lengths(self) -> list[int]:
        """Per row, the chunk's tokens (the prompt when not chunked): its mask's ones (counted once)."""
        return [int(n) for n in self.attention_mask.sum(dim=1).tolist()]

    def row_starts(self) -> list[int]:
        return self.starts or [0] * len(self.specs)

    def finals(self) -> list[bool]:
        """Per row, whether this chunk ends its prompt (the last stage then samples its first token)."""
        return [a + n == s.prompt_len for a, n, s in zip(self.row_starts(), self.lengths, self.specs, strict=True)]


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
    # Per row, what it asked to be told beyond its token, in the order a backend yields it: its
    # prompt's PromptLogprobs (first token only) and the token's Sampled. Empty: nobody asked.
    reported: list[list[Sampled | PromptLogprobs]] = field(default_factory=list)


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
        if any(msg.starts):
            tensors[g.STARTS] = _ids(msg.starts)
        route = msg.specs[0].seq if msg.specs else 0
        return Message(MsgKind.PREFILL, mb_id, route, tensors)
    if isinstance(msg, Decode):
        tensors = {g.REQUESTS: table(msg.seqs), g.X: msg.x}
        if msg.free:
            tensors[g.FREE_IDS] = _ids(msg.free)
        return Message(MsgKind.DECODE, mb_id, 0, tensors)
    if isinstance(msg, Tokens):
        extra = {}
        if any(msg.reported):
            extra = token_tensors([next((x for x in r if isinstance(x, Sampled)), None) for r in msg.reported],
                                  [next((x for x in r if isinstance(x, PromptLogprobs)), None) for r in msg.reported])
        return Message(MsgKind.TOKENS, mb_id, 0, {g.REQUESTS: table(msg.seqs), g.TOKENS: _ids(msg.tokens),
                                                  g.DONE: _ids([int(d) for d in msg.done]), **extra})
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
            starts = [int(a) for a in t[g.STARTS].tolist()] if g.STARTS in t else []
            msg = Prefill(specs, t[g.X], t[g.MASK], free, starts)
            lengths = msg.lengths if msg.attention_mask.dim() == 2 else []
            rows = zip(msg.row_starts(), lengths, specs, strict=True)
            if len(lengths) != len(specs) or len(msg.row_starts()) != len(specs) or any(
                    a < 0 or a + n > s.prompt_len for a, n, s in rows):
                raise WireError(f"prefill of {len(specs)} sequence(s): mask rows of {lengths} tokens, chunk starts "
                                f"{msg.starts or 'none'}, prompts of {[s.prompt_len for s in specs]} are inconsistent")
            return msg
        if wire.kind == MsgKind.DECODE:
            return Decode(seqs, t[g.X], free)
        if wire.kind == MsgKind.TOKENS:
            tokens, done = t[g.TOKENS].tolist(), t[g.DONE].tolist()
            if not len(tokens) == len(done) == len(seqs):
                raise WireError(f"tokens message: {len(seqs)} sequences, {len(tokens)} tokens, {len(done)} done flags")
            reported = [reported_at(t, i, int(x)) for i, x in enumerate(tokens)] if any(
                k in t for k in LOGPROB_KEYS) else []
            return Tokens(seqs, [int(x) for x in tokens], [bool(d) for d in done], reported)
        if wire.kind == MsgKind.FREE:
            return Free(free)
    except KeyError as exc:
        raise WireError(f"{MsgKind(wire.kind).name} message without its {exc} tensor") from None
    raise WireError(f"a generation stage got a {MsgKind(wire.kind).name} message")
