"""Triton W4A16 matmul: y[M, N] = x[M, K] @ dequantize(W[N, K])^T with W kept in 4-bit ggml blocks
(the table's "halves" and "pairs" formats: an fp16 scale + QK/2 index bytes per QK weights), decoded in
registers: packed bytes -> nibbles -> 16-entry value table (a kernel argument, from
felix.ops.reference.qmatmul.four_bit_layout) -> times the fp16 scale. The block geometry (QK, BLOCK_BYTES, the scale
and index offsets) is read from felix/core/formats.py into module-level constexprs, so formats.py stays the one source.

The two nibbles of a byte never have to be interleaved back into element order: the low nibbles of
a tile form one [BN, NB*HALF] operand and the high nibbles another, and the activations are loaded in
the matching order (element QK b + 2j / QK b + 2j + 1 for "pairs" layouts, QK b + j / QK b + j + HALF for
"halves"), so y = x_lo @ w_lo^T + x_hi @ w_hi^T.

* GEMV (decode, M <= 8): bandwidth-bound. A program owns BN output columns and one K range (split-K
  when N alone gives too few programs), multiplies with broadcast-and-sum in fp32 and writes fp32
  partials that the launcher sums.
* GEMM (prefill): BM x BN tiles, weights dequantized to the activation dtype and fed to tl.dot
  (WMMA on RDNA3, mma on Hopper) with fp32 accumulation; fp32 activations use input_precision="ieee".

Ragged M and N are masked; K must be a multiple of QK (whole blocks; the op layer says so).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.ops.dispatch import arch_key
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS, decode_table, four_bit_layout


def _shared_geometry():
    """(weights per block, bytes per block, scale offset, index offset), the same for every 4-bit format the
    kernels take (they differ only in value table and nibble order, kernel arguments), read off the format table."""
    geometries = {
        name: (lay.block_size, lay.bytes_per_block, lay.scale_offset, lay.qs_offset)
        for name, lay in ((n, four_bit_layout(n)) for n in QUANT_MATMUL_FORMATS)
    }
    if len(set(geometries.values())) != 1:
        raise ImportError(f"kernels/qmatmul.py decodes one block geometry; the 4-bit formats differ: {geometries}")
    return tuple(tl.constexpr(v) for v in next(iter(geometries.values())))


QK, BLOCK_BYTES, SCALE_OFFSET, QS_OFFSET = _shared_geometry()
HALF = tl.constexpr(QK // 2)  # index bytes per block: one nibble per weight
GEMV_MAX_M = 8  # decode: up to 8 tokens take the GEMV path

# Launch configurations per architecture, as data. gemv: BN output columns x NB blocks (QK weights each)
# per step at M = 1 (NB shrinks as M grows, keeping the [M, BN, NB*HALF] product in registers).
# gemm: BM x BN tiles, NB blocks per K step, GROUP_M for L2-friendly program order.
LAUNCH_CONFIGS = {
    "interpreter": {
        "gemv": {"BN": 8, "NB": 2, "num_warps": 1},
        "gemm": {"BM": 16, "BN": 16, "NB": 1, "GROUP_M": 2, "num_warps": 1, "num_stages": 1},
    },
    "gfx11": {
        "gemv": {"BN": 32, "NB": 4, "num_warps": 4},  # RDNA3 (RX 7800 XT), wave32
        "gemm": {"BM": 64, "BN": 64, "NB": 2, "GROUP_M": 8, "num_warps": 8, "num_stages": 2},
    },
    "sm90": {
        "gemv": {"BN": 32, "NB": 8, "num_warps": 4},  # Hopper
        "gemm": {"BM": 128, "BN": 128, "NB": 2, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    },
    "default": {
        "gemv": {"BN": 32, "NB": 4, "num_warps": 4},
        "gemm": {"BM": 64, "BN": 64, "NB": 2, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    },
}
# GEMV split-K aims for this many programs per compute unit (enough waves in flight to cover DRAM latency).
PROGRAMS_PER_CU = 8


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _decode_tile(
    w_ptr, lut_ptr, rn, nmask, kb0, kb_end, row_bytes, PAIRS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr
):
    """Blocks kb0 .. kb0+NB-1 of rows `rn`, decoded to fp32: (w_lo, w_hi) [BN, NB*HALF] holding the low and
    high nibbles' weights, their K offsets k_lo, k_hi [NB*HALF], and the K mask [NB*HALF]."""
    j = tl.arange(0, HALF)
    b = kb0 + tl.arange(0, NB)
    bmask = b < kb_end
    m3 = nmask[:, None, None] & bmask[None, :, None]
    blk = w_ptr + rn.to(tl.int64)[:, None, None] * row_bytes + (b * BLOCK_BYTES)[None, :, None]  # [BN, NB, 1]
    q = tl.load(blk + QS_OFFSET + j[None, None, :], mask=m3, other=0).to(tl.int32)  # [BN, NB, HALF]
    lo16 = tl.load(blk + SCALE_OFFSET, mask=m3, other=0).to(tl.uint16)
    hi16 = tl.load(blk + SCALE_OFFSET + 1, mask=m3, other=0).to(tl.uint16)
    d = (lo16 | (hi16 << 8)).to(tl.float16, bitcast=True).to(tl.float32)  # [BN, NB, 1]
    w_lo = tl.reshape(tl.load(lut_ptr + (q & 0xF)) * d, (BN, NB * HALF))
    w_hi = tl.reshape(tl.load(lut_ptr + (q >> 4)) * d, (BN, NB * HALF))
    c = tl.arange(0, NB * HALF)
    kblk = kb0 + c // HALF
    if PAIRS:
        k_lo = kblk * QK + 2 * (c % HALF)
        k_hi = k_lo + 1
    else:
        k_lo = kblk * QK + c % HALF
        k_hi = k_lo + HALF
    return w_lo, w_hi, k_lo, k_hi, kblk < kb_end


# --------------------------------------------------------------------------------------- GEMV
@triton.jit
def _qmm_gemv(
    x_ptr,
    w_ptr,
    lut_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    kb_per_split,
    PAIRS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    NB: tl.constexpr,
):
    """part[pid_k, m, n] = sum over this program's K range of x[m, k] * w[n, k] (fp32)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rm = tl.arange(0, BM)
    mmask = rm < M
    row_bytes = (K // QK) * BLOCK_BYTES
    kb_start = pid_k * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, K // QK)
    acc = tl.zeros((BM, BN), tl.float32)
    for kb0 in range(kb_start, kb_end, NB):
        w_lo, w_hi, k_lo, k_hi, kmask = _decode_tile(w_ptr, lut_ptr, rn, nmask, kb0, kb_end, row_bytes, PAIRS, BN, NB)
        xm = mmask[:, None] & kmask[None, :]
        xrow = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        x_lo = tl.load(xrow + k_lo[None, :], mask=xm, other=0.0).to(tl.float32)
        x_hi = tl.load(xrow + k_hi[None, :], mask=xm, other=0.0).to(tl.float32)
        acc += tl.sum(x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :], axis=2)
    out = part_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------------------- GEMM
@triton.jit
def _qmm_gemm(
    x_ptr,
    w_ptr,
    lut_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    PAIRS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    NB: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    kb_total = K // QK
    row_bytes = kb_total * BLOCK_BYTES
    xrow = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BN), tl.float32)
    for kb0 in range(0, kb_total, NB):
        w_lo, w_hi, k_lo, k_hi, kmask = _decode_tile(w_ptr, lut_ptr, rn, nmask, kb0, kb_total, row_bytes, PAIRS, BN, NB)
        xm = mmask[:, None] & kmask[None, :]
        x_lo = tl.load(xrow + k_lo[None, :], mask=xm, other=0.0)
        x_hi = tl.load(xrow + k_hi[None, :], mask=xm, other=0.0)
        if DOT_FP32:
            acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision="ieee")
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="ieee")
        else:
            ty = x_ptr.dtype.element_ty
            acc = tl.dot(x_lo, tl.trans(w_lo.to(ty)), acc)
            acc = tl.dot(x_hi, tl.trans(w_hi.to(ty)), acc)
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------- launchers
def gemv_config(m: int, key: str) -> dict:
    """BM (M padded to a power of two), BN, NB and num_warps of the GEMV path for `m` tokens."""
    cfg = LAUNCH_CONFIGS[key]["gemv"]
    bm = triton.next_power_of_2(max(1, m))
    return {"BM": bm, "BN": cfg["BN"], "NB": max(1, cfg["NB"] // bm), "num_warps": cfg["num_warps"]}


def gemm_config(key: str) -> dict:
    return dict(LAUNCH_CONFIGS[key]["gemm"])


def _compute_units(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(n_tiles: int, k_blocks: int, nb: int, device: torch.device) -> int:
    """Split K so that n_tiles * split reaches PROGRAMS_PER_CU programs per compute unit, each with
    at least one NB-block step."""
    want = -(-PROGRAMS_PER_CU * _compute_units(device) // n_tiles)
    return max(1, min(want, -(-k_blocks // nb)))


def quant_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    fmt: str,
    out_features: int,
    path: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16, K a multiple of the block) @ dequantize(blocks [N, K/QK*BLOCK_BYTES])^T -> [M, N].

    `path` ("gemv" or "gemm") and `split_k` override the automatic choice (M <= 8 -> gemv), for tests."""
    layout = four_bit_layout(fmt)
    m, k = x.shape
    n = out_features
    x = x.contiguous()
    blocks = blocks.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    key = arch_key(x.device)
    lut = decode_table(layout.fmt, x.device)
    path = path or ("gemv" if m <= GEMV_MAX_M else "gemm")
    if path == "gemv":
        if m > GEMV_MAX_M:
            raise ValueError(f"the GEMV path takes at most {GEMV_MAX_M} rows, got {m}")
        cfg = gemv_config(m, key)
        n_tiles = triton.cdiv(n, cfg["BN"])
        k_blocks = k // QK
        split = split_k or choose_split_k(n_tiles, k_blocks, cfg["NB"], x.device)
        kb_per_split = triton.cdiv(triton.cdiv(k_blocks, split), cfg["NB"]) * cfg["NB"]
        split = triton.cdiv(k_blocks, kb_per_split)
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _qmm_gemv[(n_tiles, split)](
            x,
            blocks,
            lut,
            part,
            m,
            n,
            k,
            x.stride(0),
            kb_per_split,
            PAIRS=layout.pairs,
            BM=cfg["BM"],
            BN=cfg["BN"],
            NB=cfg["NB"],
            num_warps=cfg["num_warps"],
        )
        return (part[0] if split == 1 else part.sum(0)).to(x.dtype)
    if path != "gemm":
        raise ValueError(f"unknown path {path!r}; paths: gemv, gemm")
    cfg = gemm_config(key)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _qmm_gemm[grid](
        x,
        blocks,
        lut,
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        PAIRS=layout.pairs,
        DOT_FP32=x.dtype == torch.float32,
        BM=cfg["BM"],
        BN=cfg["BN"],
        NB=cfg["NB"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """GEMV at 1 and 8 tokens and GEMM for fp16/bf16 activations, rq4 (pairs) and q4_0 (halves)."""
    specs = []
    gemm = gemm_config(arch)
    for act in ("fp16", "bf16"):
        for fmt in ("rq4", "q4_0"):
            pairs = four_bit_layout(fmt).pairs
            for m in (1, GEMV_MAX_M):
                cfg = gemv_config(m, arch)
                specs.append(
                    {
                        "name": f"qmm_gemv_{fmt}_{act}_m{m}",
                        "fn": _qmm_gemv,
                        "signature": {
                            "x_ptr": f"*{act}",
                            "w_ptr": "*u8",
                            "lut_ptr": "*fp32",
                            "part_ptr": "*fp32",
                            "M": "i32",
                            "N": "i32",
                            "K": "i32",
                            "stride_xm": "i32",
                            "kb_per_split": "i32",
                            "PAIRS": "constexpr",
                            "BM": "constexpr",
                            "BN": "constexpr",
                            "NB": "constexpr",
                        },
                        "constexprs": {"PAIRS": pairs, "BM": cfg["BM"], "BN": cfg["BN"], "NB": cfg["NB"]},
                        "options": {"num_warps": cfg["num_warps"]},
                    }
                )
            specs.append(
                {
                    "name": f"qmm_gemm_{fmt}_{act}",
                    "fn": _qmm_gemm,
                    "signature": {
                        "x_ptr": f"*{act}",
                        "w_ptr": "*u8",
                        "lut_ptr": "*fp32",
                        "out_ptr": f"*{act}",
                        "M": "i32",
                        "N": "i32",
                        "K": "i32",
                        "stride_xm": "i32",
                        "stride_om": "i32",
                        "PAIRS": "constexpr",
                        "DOT_FP32": "constexpr",
                        "BM": "constexpr",
                        "BN": "constexpr",
                        "NB": "constexpr",
                        "GROUP_M": "constexpr",
                    },
                    "constexprs": {
                        "PAIRS": pairs,
                        "DOT_FP32": False,
                        "BM": gemm["BM"],
                        "BN": gemm["BN"],
                        "NB": gemm["NB"],
                        "GROUP_M": gemm["GROUP_M"],
                    },
                    "options": {"num_warps": gemm["num_warps"], "num_stages": gemm["num_stages"]},
                    "expects_matrix_instructions": True,
                }
            )
    return specs
