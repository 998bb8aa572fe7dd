"""The fork's spoke residual in Triton, the SiLU bottleneck fused: ``y = h + sigmoid(gb)/S * W_up silu(W_down
rmsnorm(h) * g)`` (felix/ops/reference/spoke.py is the spec, with the backward's formulas).

Forward, ``_spoke_fwd``: one program per BLOCK_M rows. It reads its rows once for the RMS, then streams them
again through ``tl.dot`` against W_downᵀ with the norm (rs, g) applied on the fly in the prologue, so the
[BLOCK_M, R] bottleneck z = n W_downᵀ never leaves registers before SiLU; then, per BLOCK_D-wide column tile,
u = silu(z) W_upᵀ and the gated residual ``h + c u`` is written. R = n_spokes * rank <= 256 sits in one tile
(BLOCK_R, padded to a power of two >= 16). Written to memory: y, and for the backward z (fp32) and rs (fp32),
R + 1 floats per row.

Backward, two row kernels: ``_spoke_bwd_bottleneck`` (P = dy W_up, K-looped over d; dz = c P ⊙ silu'(z); the
per-row a·P for dgate) and ``_spoke_bwd_norm`` (two sweeps over d: the first accumulates q·h, q = (dz W_down) ⊙ g,
needed whole before the RMSNorm backward can be applied; the second recomputes dz W_down per tile, R-thin and
cheaper than a round trip through memory, and writes dh = dy + rs q - h rs³ (q·h)/d plus this block's partial
column sums for dnorm_weight). Split in two, and dz W_down K-chunked, so neither holds more than one
[BLOCK_M, R] tile: one kernel holding P, z and dz spilled on gfx1101. The weight gradients are token reductions, GEMMs over M:
dW_up = c dyᵀ silu(z) and dW_down = (dz ⊙ rs)ᵀ h ⊙ g run on felix.ops.kernels.lowrank's GEMM.

Dots take the operands in h's dtype (fp16/bf16 matrix units, fp32 as IEEE, never tf32; fp64 for gradient
checks); accumulation and elementwise math in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.ops.dispatch import arch_key
from felix.ops.reference.spoke import MAX_WIDTH  # n_spokes * rank: the bottleneck is held in one register tile

from .lowrank import gemm  # relative: kernels/ installs as felix.ops.kernels, and a source checkout has it as kernels

RK_CHUNK = 64  # the dh sweep's K-chunk over the bottleneck

LAUNCH_CONFIGS = {
    "interpreter": {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1},
    "gfx11": {"BLOCK_M": 32, "BLOCK_D": 32, "num_warps": 16, "num_stages": 1},
    "sm90": {"BLOCK_M": 32, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2},
    "default": {"BLOCK_M": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1},
}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _spoke_fwd(
    h_ptr,
    g_ptr,
    wd_ptr,
    wu_ptr,
    gb_ptr,
    y_ptr,
    z_ptr,
    rs_ptr,
    M,
    D,
    R,
    inv_spokes,
    eps,
    s_hm,
    s_wdr,
    s_wud,
    s_ym,
    s_zm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mmask = rm < M
    rmask = rr < R
    # 1. the RMS of each row
    ss = tl.zeros((BLOCK_M,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_ptr + rm[:, None] * s_hm + dd[None, :], mask=mmask[:, None] & (dd[None, :] < D), other=0.0).to(
            acc_t
        )
        ss += tl.sum(x * x, 1)
    rs = 1.0 / tl.sqrt(ss / D + eps)
    tl.store(rs_ptr + rm, rs, mask=mmask)
    # 2. z = (h rs g) W_downᵀ, the norm applied in the dot's prologue
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        x = tl.load(h_ptr + rm[:, None] * s_hm + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        g = tl.load(g_ptr + dd, mask=dmask, other=0.0).to(acc_t)
        n = (x.to(acc_t) * rs[:, None] * g[None, :]).to(x.dtype)
        wdt = tl.load(wd_ptr + rr[None, :] * s_wdr + dd[:, None], mask=rmask[None, :] & dmask[:, None], other=0.0)
        z = tl.dot(n, wdt, z, input_precision="ieee")
    tl.store(z_ptr + rm[:, None] * s_zm + rr[None, :], z, mask=mmask[:, None] & rmask[None, :])
    # 3. y = h + c silu(z) W_upᵀ, one column tile at a time
    c = _sigmoid(tl.load(gb_ptr).to(acc_t)) * inv_spokes
    a = (z * _sigmoid(z)).to(h_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        wut = tl.load(wu_ptr + dd[None, :] * s_wud + rr[:, None], mask=rmask[:, None] & dmask[None, :], other=0.0)
        u = tl.dot(a, wut, input_precision="ieee", out_dtype=acc_t)
        m2 = mmask[:, None] & dmask[None, :]
        x = tl.load(h_ptr + rm[:, None] * s_hm + dd[None, :], mask=m2, other=0.0).to(acc_t)
        tl.store(y_ptr + rm[:, None] * s_ym + dd[None, :], (x + c * u).to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _spoke_bwd_bottleneck(
    dy_ptr,
    h_ptr,
    wu_ptr,
    gb_ptr,
    z_ptr,
    dz_ptr,
    dzc_ptr,
    ap_ptr,
    M,
    D,
    R,
    inv_spokes,
    s_dym,
    s_wud,
    s_zm,
    s_dzm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """Per BLOCK_M rows: P = dy W_up, then dz = c P silu'(z) (stored in the accumulation dtype for dW_down and in
    h's dtype for the dh sweep) and the per-row a·P of dgate."""
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mmask = rm < M
    rmask = rr < R
    p = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        dy = tl.load(dy_ptr + rm[:, None] * s_dym + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        wu = tl.load(wu_ptr + dd[:, None] * s_wud + rr[None, :], mask=dmask[:, None] & rmask[None, :], other=0.0)
        p = tl.dot(dy, wu, p, input_precision="ieee")
    m2 = mmask[:, None] & rmask[None, :]
    z = tl.load(z_ptr + rm[:, None] * s_zm + rr[None, :], mask=m2, other=0.0)
    sz = _sigmoid(z)
    a = (z * sz).to(h_ptr.dtype.element_ty).to(acc_t)
    tl.store(ap_ptr + rm, tl.sum(a * p, 1), mask=mmask)  # dgate = Σ rows * c (1 - sigmoid(gb))
    c = _sigmoid(tl.load(gb_ptr).to(acc_t)) * inv_spokes
    dz = c * p * (sz * (1.0 + z * (1.0 - sz)))
    tl.store(dz_ptr + rm[:, None] * s_dzm + rr[None, :], dz, mask=m2)
    tl.store(dzc_ptr + rm[:, None] * s_dzm + rr[None, :], dz.to(dzc_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _dz_wd_tile(
    dzc_ptr,
    wd_ptr,
    rm,
    mmask,
    dd,
    dmask,
    R,
    s_dzm,
    s_wdr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    acc_t: tl.constexpr,
):
    """(dz W_down)[rows, dd], K-looped over the bottleneck in BLOCK_RK chunks (read from L2, not held whole)."""
    dn = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_t)
    for r0 in range(0, R, BLOCK_RK):
        rk = r0 + tl.arange(0, BLOCK_RK)
        kmask = rk < R
        dz = tl.load(dzc_ptr + rm[:, None] * s_dzm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wd = tl.load(wd_ptr + rk[:, None] * s_wdr + dd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        dn = tl.dot(dz, wd, dn, input_precision="ieee")
    return dn


@triton.jit
def _spoke_bwd_norm(
    dy_ptr,
    h_ptr,
    g_ptr,
    wd_ptr,
    dzc_ptr,
    rs_ptr,
    dh_ptr,
    dg_ptr,
    M,
    D,
    R,
    s_dym,
    s_hm,
    s_wdr,
    s_dzm,
    s_dhm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """Per BLOCK_M rows, two sweeps over d: q·h (q = (dz W_down) g, needed whole before the RMSNorm backward),
    then dh = dy + rs q - h rs³ (q·h)/d with dz W_down recomputed per tile (R-thin: cheaper than a round trip
    through memory), and this block's partial column sums of dnorm_weight."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = rm < M
    rs = tl.load(rs_ptr + rm, mask=mmask, other=0.0)
    qh = tl.zeros((BLOCK_M,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        dn = _dz_wd_tile(dzc_ptr, wd_ptr, rm, mmask, dd, dmask, R, s_dzm, s_wdr, BLOCK_M, BLOCK_D, BLOCK_RK, acc_t)
        g = tl.load(g_ptr + dd, mask=dmask, other=0.0).to(acc_t)
        x = tl.load(h_ptr + rm[:, None] * s_hm + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0).to(acc_t)
        qh += tl.sum(dn * g[None, :] * x, 1)
    coef = rs * rs * rs * qh / D
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        m2 = mmask[:, None] & dmask[None, :]
        dn = _dz_wd_tile(dzc_ptr, wd_ptr, rm, mmask, dd, dmask, R, s_dzm, s_wdr, BLOCK_M, BLOCK_D, BLOCK_RK, acc_t)
        g = tl.load(g_ptr + dd, mask=dmask, other=0.0).to(acc_t)
        x = tl.load(h_ptr + rm[:, None] * s_hm + dd[None, :], mask=m2, other=0.0).to(acc_t)
        dy = tl.load(dy_ptr + rm[:, None] * s_dym + dd[None, :], mask=m2, other=0.0).to(acc_t)
        dh = dy + rs[:, None] * dn * g[None, :] - x * coef[:, None]
        tl.store(dh_ptr + rm[:, None] * s_dhm + dd[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m2)
        tl.store(dg_ptr + pid * D + dd, tl.sum(dn * x * rs[:, None], 0), mask=dmask)


def block_r(width: int) -> int:
    return max(16, triton.next_power_of_2(max(width, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(h, norm_weight, w_down, w_up, gate_bias, n_spokes: int, eps: float):
    """h [M, d] -> (y [M, d], z [M, R] fp32, rs [M] fp32): see kernels' module docstring."""
    M, D = h.shape
    R = w_down.shape[0]
    if R > MAX_WIDTH:
        raise ValueError(
            f"n_spokes * spoke_rank = {R} > {MAX_WIDTH}: the fused spoke kernel holds the bottleneck "
            f"in one register tile"
        )
    cfg = LAUNCH_CONFIGS[arch_key(h.device)]
    acc = _acc_dtype(h.dtype)
    y = torch.empty_like(h)
    z = torch.empty(M, R, dtype=acc, device=h.device)
    rs = torch.empty(M, dtype=acc, device=h.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _spoke_fwd[grid](
        h,
        norm_weight.to(acc).contiguous(),
        w_down,
        w_up,
        gate_bias.to(acc).contiguous(),
        y,
        z,
        rs,
        M,
        D,
        R,
        1.0 / n_spokes,
        eps,
        h.stride(0),
        w_down.stride(0),
        w_up.stride(0),
        y.stride(0),
        z.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=block_r(R),
        ACC_FP64=acc == torch.float64,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y, z, rs


def backward(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes: int):
    """(dh, dnorm_weight, dW_down, dW_up, dgate_bias) of forward() for output gradient dy."""
    M, D = h.shape
    R = w_down.shape[0]
    cfg = LAUNCH_CONFIGS[arch_key(h.device)]
    acc = _acc_dtype(h.dtype)
    grid_m = triton.cdiv(M, cfg["BLOCK_M"])
    g = norm_weight.to(acc).contiguous()
    gb = gate_bias.to(acc).contiguous()
    dh = torch.empty_like(h)
    dz = torch.empty(M, R, dtype=acc, device=h.device)
    dz_compute = torch.empty(M, R, dtype=h.dtype, device=h.device)
    ap = torch.empty(M, dtype=acc, device=h.device)
    dg_part = torch.empty(grid_m, D, dtype=acc, device=h.device)
    meta = dict(
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=block_r(R),
        ACC_FP64=acc == torch.float64,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    _spoke_bwd_bottleneck[(grid_m,)](
        dy,
        h,
        w_up,
        gb,
        z,
        dz,
        dz_compute,
        ap,
        M,
        D,
        R,
        1.0 / n_spokes,
        dy.stride(0),
        w_up.stride(0),
        z.stride(0),
        dz.stride(0),
        **meta,
    )
    meta = dict(meta)
    norm_meta = {**meta, "BLOCK_RK": min(meta.pop("BLOCK_R"), RK_CHUNK)}
    _spoke_bwd_norm[(grid_m,)](
        dy,
        h,
        g,
        w_down,
        dz_compute,
        rs,
        dh,
        dg_part,
        M,
        D,
        R,
        dy.stride(0),
        h.stride(0),
        w_down.stride(0),
        dz_compute.stride(0),
        dh.stride(0),
        **norm_meta,
    )
    sig = torch.sigmoid(gb.reshape(()))
    c = sig / n_spokes
    a = torch.nn.functional.silu(z).to(h.dtype)
    dwu = gemm(dy.t(), a, out_dtype=acc) * c  # c dyᵀ silu(z)      [d, R]
    dwd = gemm((dz * rs[:, None]).to(h.dtype).t(), h, out_dtype=acc) * g  # (dz rs)ᵀ h ⊙ g     [R, d]
    dgate = ap.sum() * c * (1 - sig)
    return (
        dh,
        dg_part.sum(0).to(norm_weight.dtype),
        dwd.to(w_down.dtype),
        dwu.to(w_up.dtype),
        dgate.reshape(gate_bias.shape).to(gate_bias.dtype),
    )


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """Both kernels as the op launches them, fp16 and bf16, at the widest bottleneck (BLOCK_R 256: 4 spokes of
    rank 64, the seed's recipe)."""
    cfg = LAUNCH_CONFIGS[arch]
    common = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"], "BLOCK_R": MAX_WIDTH, "ACC_FP64": False}
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    specs = []
    for dt in ("fp16", "bf16"):
        fwd_sig = {
            "h_ptr": f"*{dt}",
            "g_ptr": "*fp32",
            "wd_ptr": f"*{dt}",
            "wu_ptr": f"*{dt}",
            "gb_ptr": "*fp32",
            "y_ptr": f"*{dt}",
            "z_ptr": "*fp32",
            "rs_ptr": "*fp32",
            "M": "i32",
            "D": "i32",
            "R": "i32",
            "inv_spokes": "fp32",
            "eps": "fp32",
            "s_hm": "i32",
            "s_wdr": "i32",
            "s_wud": "i32",
            "s_ym": "i32",
            "s_zm": "i32",
            "BLOCK_M": "constexpr",
            "BLOCK_D": "constexpr",
            "BLOCK_R": "constexpr",
            "ACC_FP64": "constexpr",
        }
        specs.append(
            {
                "name": f"spoke_fwd_{dt}",
                "fn": _spoke_fwd,
                "signature": fwd_sig,
                "constexprs": common,
                "options": opts,
                "aligned": ["h_ptr", "g_ptr", "wd_ptr", "wu_ptr", "y_ptr", "z_ptr", "rs_ptr"],
                "expects_matrix_instructions": True,
            }
        )
        bott_sig = {
            "dy_ptr": f"*{dt}",
            "h_ptr": f"*{dt}",
            "wu_ptr": f"*{dt}",
            "gb_ptr": "*fp32",
            "z_ptr": "*fp32",
            "dz_ptr": "*fp32",
            "dzc_ptr": f"*{dt}",
            "ap_ptr": "*fp32",
            "M": "i32",
            "D": "i32",
            "R": "i32",
            "inv_spokes": "fp32",
            "s_dym": "i32",
            "s_wud": "i32",
            "s_zm": "i32",
            "s_dzm": "i32",
            "BLOCK_M": "constexpr",
            "BLOCK_D": "constexpr",
            "BLOCK_R": "constexpr",
            "ACC_FP64": "constexpr",
        }
        specs.append(
            {
                "name": f"spoke_bwd_bottleneck_{dt}",
                "fn": _spoke_bwd_bottleneck,
                "signature": bott_sig,
                "constexprs": common,
                "options": opts,
                "aligned": ["dy_ptr", "h_ptr", "wu_ptr", "z_ptr", "dz_ptr", "dzc_ptr"],
                "expects_matrix_instructions": True,
            }
        )
        norm_sig = {
            "dy_ptr": f"*{dt}",
            "h_ptr": f"*{dt}",
            "g_ptr": "*fp32",
            "wd_ptr": f"*{dt}",
            "dzc_ptr": f"*{dt}",
            "rs_ptr": "*fp32",
            "dh_ptr": f"*{dt}",
            "dg_ptr": "*fp32",
            "M": "i32",
            "D": "i32",
            "R": "i32",
            "s_dym": "i32",
            "s_hm": "i32",
            "s_wdr": "i32",
            "s_dzm": "i32",
            "s_dhm": "i32",
            "BLOCK_M": "constexpr",
            "BLOCK_D": "constexpr",
            "BLOCK_RK": "constexpr",
            "ACC_FP64": "constexpr",
        }
        specs.append(
            {
                "name": f"spoke_bwd_norm_{dt}",
                "fn": _spoke_bwd_norm,
                "signature": norm_sig,
                "constexprs": {**{k: v for k, v in common.items() if k != "BLOCK_R"}, "BLOCK_RK": RK_CHUNK},
                "options": opts,
                "aligned": ["dy_ptr", "h_ptr", "g_ptr", "wd_ptr", "dzc_ptr", "dh_ptr", "dg_ptr"],
                "expects_matrix_instructions": True,
            }
        )
    return specs
