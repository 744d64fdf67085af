"""`python:` model factories for the per-hop benchmark: chains of no-op units.

Each factory returns an nn.Sequential of `UNITS` nn.Identity units whose `input_shape`
makes one sample (float32) exactly the named number of bytes, so a one-sample
micro-batch carries that payload over every edge and the stages compute nothing.

    source = "python:benchmarks.identity:identity_64k"
"""

from __future__ import annotations

from torch import nn

# Enough units for the deepest pipeline the hop benchmark builds (one unit per stage at least).
UNITS = 4
FLOAT32_BYTES = 4


def identity_chain(payload_bytes: int) -> nn.Sequential:
    """UNITS identity units; one sample is a float32 vector of `payload_bytes` bytes."""
    if payload_bytes % FLOAT32_BYTES:
        raise ValueError(f"payload_bytes must be a multiple of {FLOAT32_BYTES}, got {payload_bytes}")
    model = nn.Sequential(*(nn.Identity() for _ in range(UNITS)))
    model.input_shape = (payload_bytes // FLOAT32_BYTES,)  # type: ignore[assignment]
    return model


def identity_4k() -> nn.Sequential:
    return identity_chain(4 * 1024)


def identity_64k() -> nn.Sequential:
    return identity_chain(64 * 1024)


def identity_1m() -> nn.Sequential:
    return identity_chain(1024 * 1024)


# Payload size (bytes) -> factory name, for the benchmark that builds job configs.
FACTORIES = {4 * 1024: "identity_4k", 64 * 1024: "identity_64k", 1024 * 1024: "identity_1m"}
