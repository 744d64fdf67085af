"""Every Triton kernel of the package compiles for a Hopper GPU (sm_90) without one.

Triton's front end and ptxas run on the CPU, so a kernel that would fail to compile on the
device (a name defined in one compile-time branch only, a type that differs between branches)
fails here, before a device call finds it (BENCHMARKS.md section 27: one did). Each case calls
a kernel's real launcher (the custom op or `_launch`) on small CPU tensors with the kernel
replaced by a recorder, so the compiled signature and compile-time constants are the ones the
launcher passes, not a copy of them. Skips without Triton (CI installs the CPU torch wheel,
which has none) and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels are then Python functions: nothing to compile
    pytest.skip("TRITON_INTERPRET=1: run without the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from infscaled.generation import triton_decode, triton_layer  # noqa: E402
from infscaled.generation.kv import PAGE_TOKENS  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "i1"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append((args, kwargs))
        return launch


def _compile(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Compile `kernel` for sm_90 with a launch's arguments' types and constants; its PTX."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    runtime = [n for n in kernel.arg_names if n not in kwargs]
    assert len(runtime) == len(args), (runtime, len(args))
    signature: dict[str, str] = {}
    for name, value in zip(runtime, args, strict=True):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            assert isinstance(value, float), (name, value)
            signature[name] = "fp32"
    signature |= dict.fromkeys(kwargs, "constexpr")
    try:
        # Constants keyed by (argument index,): what every Triton since 3.2 takes (newer ones take names too).
        constants = {(kernel.arg_names.index(n),): v for n, v in kwargs.items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:  # the wheel has no ptxas for this platform: the front end ran
        if "ptxas" not in str(exc).lower():
            raise
        pytest.skip(f"Triton's ptxas unavailable: {exc}")
    return str(compiled.asm["ptx"])


def _launches(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, call: Callable[[], Any]) -> list[str]:
    """Run `call` with `module.name` recording its launches; each launch compiled: their PTX."""
    kernel = getattr(module, name)
    recorder = _Recorder()
    monkeypatch.setattr(module, name, recorder)
    call()
    monkeypatch.setattr(module, name, kernel)
    assert recorder.launches, f"{name} was not launched"
    return [_compile(kernel, args, kwargs) for args, kwargs in recorder.launches]


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_paged_decode_compiles(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, split: bool) -> None:
    hq, hkv, dh, pages = 6, 2, 128, 16
    pool = torch.zeros(pages + 1, PAGE_TOKENS, hkv, dh, dtype=dtype)
    table = torch.zeros(2, pages // 2, dtype=torch.int64)  # 128 positions a row: two blocks to split
    query = torch.zeros(2, hq, dh, dtype=dtype)
    ptx = _launches(monkeypatch, triton_decode, "_paged_decode_kernel", lambda: triton_decode._launch(
        query, pool, pool, table, torch.zeros(2, dtype=torch.int64), 0.1, 0, split_programs=1000 if split else 0))
    # The split variant merges in the same launch (an atomic per row); the unsplit one has none.
    assert ("atom.global" in ptx[0]) == split


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_gating_kernels_compile(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    x, w = torch.zeros(3, 200, dtype=dtype), torch.ones(200, dtype=dtype)
    _launches(monkeypatch, triton_layer, "_rms_norm_kernel", lambda: torch.ops.infscaled.rms_norm(x, w, 1e-5))
    _launches(monkeypatch, triton_layer, "_rms_norm_kernel",
              lambda: torch.ops.infscaled.add_rms_norm(x, x.clone(), w, 1e-5))
    _launches(monkeypatch, triton_layer, "_silu_mul_kernel",
              lambda: torch.ops.infscaled.silu_mul(torch.zeros(2, 1, 2 * 96, dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kernels_compile(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    heads, kv_heads, head_dim, rows, t, pages = 6, 2, 128, 2, 5, 4
    pools = [torch.zeros(pages + 1, PAGE_TOKENS, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    width = (heads + 2 * kv_heads) * head_dim
    step = torch.zeros(rows, 1, width, dtype=dtype)
    angles = torch.zeros(rows, 1, head_dim, dtype=dtype)
    table, positions = torch.zeros(rows, 2, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)
    _launches(monkeypatch, triton_layer, "_rotary_kv_kernel", lambda: torch.ops.infscaled.rotary_kv(
        step, angles, angles, *pools, table, positions, heads, kv_heads, head_dim))
    prompt = torch.zeros(rows, t, width, dtype=dtype)
    cos = torch.zeros(1, t, head_dim, dtype=dtype)
    _launches(monkeypatch, triton_layer, "_rotary_qkv_kernel", lambda: torch.ops.infscaled.rotary_qkv(
        prompt, cos, cos, heads, kv_heads, head_dim, 3))
    slots = torch.zeros(rows * t, dtype=torch.int64)
    _launches(monkeypatch, triton_layer, "_rotary_qkv_kernel", lambda: torch.ops.infscaled.rotary_qkv_pages(
        prompt, cos, cos, *pools, slots, heads, kv_heads, head_dim, 1))
