"""How far each op's backends may be from its float64 truth: one (op, dtype) -> tolerance table.

`felix selftest`, the CPU tests (reference backend, Triton interpreter) and the GPU tier all read their bounds from
here, so a bound is stated, derived and changed in one place. Each bound is a relative error: max |got - truth|
over max |truth| (the loss parts over max(1, |truth|); quant_matmul over max sum |x||w|), and is never loosened
after a failure. The op names carry the tier where one op is checked at different sizes:

* ``<op>``              `felix selftest` on this machine's device (any backend; small shapes on CPU, Felix
                        sizes on a GPU)
* ``<op>/interpreter``  the Triton kernels under TRITON_INTERPRET=1 on tiny ragged shapes (fp32 and fp16 only)
* ``<op>/gpu``          the GPU tier (tests/*/test_gpu_*.py) at Felix sizes
* ``<op>/reference``    the torch reference backend against the textbook truth

Derivations (u = unit roundoff: 2^-24 fp32, 2^-11 fp16, 2^-8 bf16):

* fp32 rows are IEEE dots of at most a few thousand terms (never tf32): a few 1e-6, bounded at 2e-5 (1e-4 where
  the GPU tier sums tens of thousands of vocabulary terms).
* fp16 / bf16 rows: the kernels round the operands they feed to matrix units (P and dS in attention, n and silu(z)
  in the spoke, U in the low-rank add, the weights in the quant_matmul GEMM) to the input dtype; one rounding of
  ~u per operand, accumulated in fp32, gives ~2-8 u: 4e-3 / 5e-3 fp16, 3e-2 bf16 (8e-3 for quant_matmul, whose
  error is measured against sum |x||w| instead of the result).
* attention/interpreter: measured fp32 <= 8e-7 and fp16 <= 5.5e-4 (one fp16 ulp of P / dS, 4.9e-4): 5e-6 / 2e-3.
* the spoke's selftest bound is 4x the low-rank one below fp32: two chained low-rank products (W_down then W_up)
  with a rounded rmsnorm in front.
* linear_ce_quail/huge_logits: logits ~1e4 in fp32 are only good to ~1e4 * 2^-24 * d ~ 5e-3 absolute, which the
  softmax turns into relative gradient errors of up to ~5e-4; measured over 1,500 seeds: max 2.3e-4 (dh).
* linear_ce_quail/reference: the chunked torch path is the spec's math reordered: float64 1e-10, float32 2e-5.
"""

from __future__ import annotations

import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

_BY_OP: dict[str, dict[torch.dtype, float]] = {
    # felix selftest
    "quant_matmul": {F32: 2e-5, F16: 1.5e-3, BF16: 8e-3},
    "attention": {F32: 2e-5, F16: 4e-3, BF16: 3e-2},
    "linear_ce_quail": {F32: 1e-4, F16: 5e-3, BF16: 3e-2},
    "lowrank_linear": {F32: 2e-5, F16: 4e-3, BF16: 3e-2},
    "spoke_residual": {F32: 2e-5, F16: 4 * 4e-3, BF16: 4 * 3e-2},
    # the Triton interpreter tier
    "attention/interpreter": {F32: 5e-6, F16: 2e-3},
    "linear_ce_quail/interpreter": {F32: 2e-5, F16: 5e-3},
    "lowrank_linear/interpreter": {F32: 2e-5, F16: 4e-3},
    "spoke_residual/interpreter": {F32: 2e-5, F16: 4e-3},
    # the GPU tier (gradients of the low-rank and spoke ops: 4x, sums over thousands of tokens)
    "quant_matmul/gpu": {F32: 2e-5, F16: 1.5e-3, BF16: 8e-3},
    "linear_ce_quail/gpu": {F32: 1e-4, F16: 5e-3, BF16: 3e-2},
    "lowrank_linear/gpu": {F32: 1e-4, F16: 5e-3, BF16: 3e-2},
    "spoke_residual/gpu": {F32: 1e-4, F16: 5e-3, BF16: 3e-2},
    # the reference backend against the textbook truth
    "linear_ce_quail/reference": {F64: 1e-10, F32: 2e-5},
    "linear_ce_quail/huge_logits": {F32: 1e-3},
}

TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    (op, dtype): tol for op, row in _BY_OP.items() for dtype, tol in row.items()
}


def tolerance(op: str, dtype: torch.dtype) -> float:
    """The bound of `op` (with its tier suffix, see the module doc) for inputs of `dtype`."""
    try:
        return TOLERANCES[(op, dtype)]
    except KeyError:
        known = ", ".join(f"{o} {str(d).removeprefix('torch.')}" for o, d in TOLERANCES)
        raise KeyError(f"no tolerance for ({op!r}, {dtype}); known: {known}") from None


def tolerances(op: str) -> dict[torch.dtype, float]:
    """{dtype: bound} of `op` (a copy)."""
    if op not in _BY_OP:
        raise KeyError(f"no tolerances for {op!r}; known: {', '.join(_BY_OP)}")
    return dict(_BY_OP[op])


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want float64, on the CPU), the error every row of the table bounds."""
    return float((got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))
