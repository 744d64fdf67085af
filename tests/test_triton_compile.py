"""The paged decode kernel compiles for a Hopper GPU (sm_90) without one: Triton's front end and
ptxas run on the CPU, so a kernel that would fail to compile on the device (a name defined in
one compile-time branch only, a type that differs between branches) fails here first. Skips
without Triton (CI installs the CPU torch wheel, which has none).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from infscaled.generation import triton_decode  # noqa: E402

# _paged_decode_kernel's runtime arguments, in order (pointers, then integers and floats).
_ARGS = ["*{d}", "*{d}", "*{d}", "*i64", "*i64", "*{d}", "*fp32", "*fp32", "*i32",
         "i32", "i32", "i32", "i32", "i32", "i32", "i32", "i32", "fp32", "i64", "i32"]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("dtype", "precision"), [("bf16", "tf32"), ("fp32", "ieee")])
def test_paged_decode_kernel_compiles_for_sm90(split: bool, dtype: str, precision: str) -> None:
    kernel = triton_decode._paged_decode_kernel
    consts = {"GROUP": 3, "BLOCK_H": 16, "D": 128, "PAGE": 16, "BLOCK_T": triton_decode.BLOCK_T,
              "PRECISION": precision, "SPLIT": split}
    runtime = [n for n in kernel.arg_names if n not in consts]
    assert len(runtime) == len(_ARGS)
    signature = {n: t.format(d=dtype) for n, t in zip(runtime, _ARGS, strict=True)} | dict.fromkeys(consts, "constexpr")
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_decode.NUM_WARPS})
    except RuntimeError as exc:  # no ptxas for this platform in the wheel: the front end ran
        if "ptxas" not in str(exc).lower():
            raise
        pytest.skip(f"Triton's ptxas unavailable: {exc}")
    ptx = compiled.asm["ptx"]
    # The split variant merges in the same launch (an atomic per row); the unsplit one has none.
    assert ("atom.global" in ptx) == split
