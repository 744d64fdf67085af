"""The generation data plane's messages (no torch): what each kind means and carries.

A replica chain r is stage replicas (0, r) -> (1, r) -> ... -> (p-1, r), closed by a loop edge
(p-1, r) -> (0, r); every sequence lives on one chain. The header's kind (protocol/wire.py)
says what a message is; its tensors are named and laid out as below, in this order. Every
message carries the request table `requests` [n, 2] (sequence id, 1), which stats count.

    kind     edge                       fields (tensor name: shape, dtype)
    PREFILL  dispatcher -> stage 0      requests; x: input_ids [n, T] int64, right-padded;
             stage i -> i+1             attention_mask [n, T] int64; specs: [bytes] uint8, the
                                        rows' SequenceSpecs (JSON, below); free: [m] int64 (opt.);
                                        starts: [n] int64 (opt., zeros when absent): a chunk of a
                                        longer prompt (chunked prefill) holds the row's positions
                                        starts..starts+len-1 (len: its mask's ones), the earlier
                                        ones cached by earlier chunks; the row's last chunk is the
                                        one that reaches its spec's prompt_len
                                        (between stages x is the hidden state [n, T, D])
    DECODE   stage 0 -> 1 -> ...        requests; x: next input ids [n, 1] int64 on stage 0's
                                        in-edge, hidden [n, 1, D] further down; free (opt.)
    TOKENS   last -> dispatcher,        requests; tokens: [n] int64; done: [n] int64 (0/1)
             last -> stage 0 (loop)
    FREE     dispatcher -> stage 0,     requests (empty); free: [m] int64: drop these sequences'
             stage i -> i+1             caches (cancelled, timed out, finished elsewhere)

Per-sequence facts that are not tensors travel once, in the prefill's `specs`: a JSON list of
SequenceSpec objects, so adding a per-sequence field (a sampling option, a replay position)
never costs a tensor slot of the wire header.

Ordering contract: every edge is FIFO, so a FREE (or a `free` list riding on a later message)
reaches each stage of the chain before any later allocation that the freed room admitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from infscaled.errors import WireError
from infscaled.generation.params import SamplingParams

# Names of the tensors, shared by both ends (HOST tensors keep to the header channel on NCCL edges).
REQUESTS = "requests"
X = "x"
MASK = "attention_mask"
SPECS = "specs"
FREE_IDS = "free"
STARTS = "starts"
TOKENS = "tokens"
DONE = "done"

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_TUPLE_FIELDS = {"stop_token_ids", "stop"}


@dataclass(frozen=True)
class SequenceSpec:
    """What every stage may need to know about one sequence, sent with its prefill."""

    seq: int
    """The dispatcher's sequence id (unique within the job)."""
    prompt_len: int
    """Tokens prefilled: the prompt, plus the tokens already generated when a sequence is replayed."""
    reserve: int
    """KV positions this sequence may ever hold on each stage: prompt_len + tokens still to generate."""
    sampling: SamplingParams
    """How the last stage picks the sequence's tokens (max_new_tokens counts from `produced`)."""
    produced: int = 0
    """Tokens generated before this prefill (a replayed sequence continues from there)."""
    prompt: tuple[int, ...] = ()
    """The prompt's ids (the client's prompt, without tokens generated before a replay), sent only
    when the last stage needs them (repetition penalty, prompt log-probabilities): further stages
    see hidden states, not ids."""
    generated: tuple[int, ...] = ()
    """A replayed sequence's tokens generated so far (the last `produced` ids of its prefill), sent
    only when its sampling reads them (penalties, min_tokens), so that it continues exactly."""

    def __post_init__(self) -> None:
        if (self.seq < 0 or self.prompt_len < 1 or self.reserve < self.prompt_len or self.produced < 0
                or len(self.generated) not in (0, self.produced)):
            raise WireError(f"sequence spec {self.seq}: prompt_len {self.prompt_len}, reserve {self.reserve}, "
                            f"produced {self.produced}, {len(self.generated)} generated ids are inconsistent")

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still generate."""
        return self.sampling.max_new_tokens - self.produced


def encode_specs(specs: list[SequenceSpec]) -> bytes:
    """The `specs` tensor's bytes (strict JSON)."""
    return json.dumps([asdict(s) for s in specs], allow_nan=False, separators=(",", ":")).encode()


def decode_specs(data: bytes) -> list[SequenceSpec]:
    """Inverse of encode_specs; raises WireError naming what is malformed."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"sequence specs are not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise WireError("sequence specs must be a JSON list")
    out = []
    for i, item in enumerate(raw):
        try:
            sampling = dict(item["sampling"])
            unknown = set(sampling) - _SAMPLING_FIELDS
            if unknown:
                raise WireError(f"unknown sampling field(s) {sorted(unknown)}")
            for name in _TUPLE_FIELDS & set(sampling):
                sampling[name] = tuple(sampling[name])
            out.append(SequenceSpec(int(item["seq"]), int(item["prompt_len"]), int(item["reserve"]),
                                    SamplingParams(**sampling), int(item.get("produced", 0)),
                                    tuple(int(x) for x in item.get("prompt", ())),
                                    tuple(int(x) for x in item.get("generated", ()))))
        except WireError as exc:
            raise WireError(f"sequence spec {i}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"sequence spec {i} is malformed: {type(exc).__name__}: {exc}") from None
    return out
