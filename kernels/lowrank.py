"""SpliceCore low-rank add in Triton: y = x Wᵀ + b + (x Aᵀ) Bᵀ with the low-rank term fused into the
main GEMM's epilogue, so y is written once.

One GEMM kernel, ``_gemm_lowrank``, computes ``C = A_op B_op (+ U V) (+ bias)`` for operands given by
strides (so transposes cost nothing): each program accumulates its ``[BLOCK_M, BLOCK_N]`` tile of
``A_op B_op`` over K in fp32, then adds the rank-R product of its rows of U ``[M, R]`` and columns of
V ``[R, N]`` with one more ``tl.dot`` (R padded to BLOCK_R >= 16), adds the bias and stores. Every
product of the op is this kernel:

* forward:  U = x Aᵀ  (R columns);   y = x Wᵀ + U Bᵀ + b
* backward: P = dy B;   dx = dy W + P A;   Q = dyᵀ U (-> dB);   dA = Pᵀ x;   dW = dyᵀ x (trainable W only)

Gates never reach the kernel: the op layer folds them into B (``B_eff = g ⊙ B``, an ``[out, r]``
tensor), and autograd carries dg and dB through that fold on r-sized tensors. Several low-rank terms
are concatenated along r. Operands: fp16/bf16 (matrix units) or fp32 (IEEE dots, never tf32), fp64 for
gradient checks; accumulation fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.ops.dispatch import arch_key
from felix.ops.reference.lowrank import MAX_RANK

# Launch configurations per architecture, as data (tiles for the big GEMMs; the rank-sized products
# use the same kernel with their own small N or M, masked).
LAUNCH_CONFIGS = {
    "interpreter": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1},
    "gfx11": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 1},
    "sm90": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    "default": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
}


@triton.jit
def _gemm_lowrank(
    a_ptr,
    b_ptr,
    c_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    M,
    N,
    K,
    R,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    s_um,
    s_ur,
    s_vr,
    s_vn,
    HAS_LR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share their B_op columns while they are in cache
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        b = tl.load(
            b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_LR:  # the low-rank term rides along in the epilogue: one more dot, rank R <= BLOCK_R
        rr = tl.arange(0, BLOCK_R)
        u = tl.load(
            u_ptr + rm[:, None] * s_um + rr[None, :] * s_ur, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0
        )
        v = tl.load(
            v_ptr + rr[:, None] * s_vr + rn[None, :] * s_vn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0
        )
        acc = tl.dot(u, v, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    tl.store(
        c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def gemm(
    a_op: torch.Tensor, b_op: torch.Tensor, u=None, v=None, bias=None, out=None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """C = a_op @ b_op (+ u @ v) (+ bias), a_op [M, K], b_op [K, N] (any strides: pass transposed views)."""
    M, K = a_op.shape
    N = b_op.shape[1]
    cfg = LAUNCH_CONFIGS[arch_key(a_op.device)]
    c = out if out is not None else torch.empty(M, N, dtype=out_dtype or a_op.dtype, device=a_op.device)
    has_lr = u is not None
    R = u.shape[1] if has_lr else 0
    if has_lr and R > MAX_RANK:
        raise ValueError(f"low-rank term of rank {R} > {MAX_RANK}")
    dummy = a_op
    u_, v_ = (u, v) if has_lr else (dummy, dummy)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gemm_lowrank[grid](
        a_op,
        b_op,
        c,
        u_,
        v_,
        bias if bias is not None else dummy,
        M,
        N,
        K,
        R,
        a_op.stride(0),
        a_op.stride(1),
        b_op.stride(0),
        b_op.stride(1),
        c.stride(0),
        c.stride(1),
        u_.stride(0),
        u_.stride(1) if has_lr else 0,
        v_.stride(0),
        v_.stride(1) if has_lr else 0,
        HAS_LR=has_lr,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=_block_r(R),
        GROUP_M=cfg["GROUP_M"],
        ACC_FP64=a_op.dtype == torch.float64,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return c


def forward(x, weight, bias, a, b):
    """x [M, in], weight [out, in], a [r, in], b [out, r] (gates already folded in) -> (y [M, out], U [M, r])."""
    u = gemm(x, a.t())  # U = x Aᵀ, stored in x's dtype for the epilogue dot
    y = gemm(x, weight.t(), u=u, v=b.t(), bias=bias)  # y = x Wᵀ + U Bᵀ + bias, written once
    return y, u


def backward(dy, x, weight, a, b, u, need_weight_grad: bool, has_bias: bool):
    """Gradients (dx, dW or empty, dbias or empty, dA, dB) of forward() for output gradient dy."""
    p = gemm(dy, b)  # P = dy B            [M, r]
    dx = gemm(dy, weight, u=p, v=a)  # dx = dy W + P A     [M, in]
    db_ = gemm(dy.t(), u)  # dB = dyᵀ U          [out, r]
    da = gemm(p.t(), x)  # dA = Pᵀ x           [r, in]
    dw = gemm(dy.t(), x) if need_weight_grad else x.new_empty(0)
    dbias = (
        dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(dy.dtype)
        if has_bias
        else x.new_empty(0)
    )
    return dx, dw, dbias, da, db_


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """The fused GEMM as the op launches it: with the low-rank epilogue (y, dx) and without (dW, U, P),
    fp16 and bf16, rank 64 (BLOCK_R 64, the largest)."""
    cfg = LAUNCH_CONFIGS[arch]
    specs = []
    for dt in ("fp16", "bf16"):
        for has_lr in (True, False):
            sig = {
                "a_ptr": f"*{dt}",
                "b_ptr": f"*{dt}",
                "c_ptr": f"*{dt}",
                "u_ptr": f"*{dt}",
                "v_ptr": f"*{dt}",
                "bias_ptr": f"*{dt}",
                "M": "i32",
                "N": "i32",
                "K": "i32",
                "R": "i32",
                "s_am": "i32",
                "s_ak": "constexpr",
                "s_bk": "constexpr",
                "s_bn": "i32",
                "s_cm": "i32",
                "s_cn": "constexpr",
                "s_um": "i32",
                "s_ur": "constexpr",
                "s_vr": "constexpr",
                "s_vn": "i32",
                "HAS_LR": "constexpr",
                "HAS_BIAS": "constexpr",
                "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr",
                "BLOCK_R": "constexpr",
                "GROUP_M": "constexpr",
                "ACC_FP64": "constexpr",
            }
            # the forward's layout: x [M, K] row-major, Wᵀ as a view (stride_k 1), Bᵀ as a view
            specs.append(
                {
                    "name": f"gemm_lowrank{'_epilogue' if has_lr else ''}_{dt}",
                    "fn": _gemm_lowrank,
                    "signature": sig,
                    "constexprs": {
                        "s_ak": 1,
                        "s_bk": 1,
                        "s_cn": 1,
                        "s_ur": 1,
                        "s_vr": 1,
                        "HAS_LR": has_lr,
                        "HAS_BIAS": True,
                        "BLOCK_M": cfg["BLOCK_M"],
                        "BLOCK_N": cfg["BLOCK_N"],
                        "BLOCK_K": cfg["BLOCK_K"],
                        "BLOCK_R": 64,
                        "GROUP_M": cfg["GROUP_M"],
                        "ACC_FP64": False,
                    },
                    "options": {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    "aligned": ["a_ptr", "b_ptr", "c_ptr", "u_ptr", "v_ptr", "bias_ptr"],
                    "expects_matrix_instructions": True,
                }
            )
    return specs
