"""The block-quantization formats Felix reads and writes: one table, the single source of truth.

Every codec backend (the torch reference, the Triton kernels, the C++ extension) takes its block
geometry and codebook from here. Tests check this table against gguf-py's constants and the C++
extension's compiled-in layout, so a typo anywhere fails loudly.

Byte layouts (little endian, one ggml block each):

=========  =====  =====  ====================================================================
format     block  bytes  layout
=========  =====  =====  ====================================================================
q8_0       32     34     fp16 d, then 32 x int8 q;             x = d * q
q4_0       32     18     fp16 d, then 16 bytes: byte j = q[j] | q[j+16] << 4;   x = d * (q - 8)
iq4_nl     32     18     fp16 d, then 16 bytes as q4_0;       x = d * IQ4_NL_VALUES[q]
rq4        32     18     fp16 d, then 16 bytes: byte j = q[2j] | q[2j+1] << 4;  x = d * RQ4_CODEBOOK[q]
tq2_0      256    66     64 bytes: element 128c+32l+m in byte 32c+m, bits 2l..2l+1; then fp16 d;
                         x = d * (q - 1)
=========  =====  =====  ====================================================================

RQ4 ("BetaQ") is the Felix deployment format of the llama.cpp fork: ggml type 42, its codebook the
conditional means of 16 equal-probability bins of Beta(127.5, 127.5) on [-1, 1].
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# ggml's kvalues_iq4nl (ggml-common.h): the non-linear 4-bit grid of IQ4_NL, in units of the scale.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# The fork's rq4_codebook (ggml-quants.c), ascending. Stored as float32 literals exactly as in C.
RQ4_CODEBOOK = (
    -0.12281943, -0.08296703, -0.06342665, -0.04873108,
    -0.03634204, -0.02524078, -0.01488395, -0.00492020,
    0.00492020, 0.01488395, 0.02524078, 0.03634204,
    0.04873108, 0.06342665, 0.08296703, 0.12281943,
)

FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantFormat:
    """Geometry of one ggml block format."""

    name: str                 # Felix's name, as accepted by felix.quantize
    ggml_type: int            # enum ggml_type value
    ggml_name: str            # name in gguf-py / ggml
    block_size: int           # weights per block
    bytes_per_block: int      # bytes per block, scale included
    scale_offset: int         # byte offset of the fp16 scale inside a block
    codebook: tuple | None    # index -> value in units of the scale; None for linear grids
    range_divisor: float      # |d| <= amax / range_divisor for every block (bounds the input range)
    description: str
    # ggml CPU's vec_dot_type: what a matmul against this weight type rounds its activations to first
    # (felix.activation_rounding models it for the fidelity harness's simulated path)
    vec_dot_type: str = "q8_0"
    runtime: str = "stock"    # "stock": stock llama.cpp runs it; "fork": only the Felix llama.cpp fork does

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block_size

    @property
    def max_abs_input(self) -> float:
        """Largest |x| whose block scale still fits in fp16 (beyond it the scale would be inf)."""
        return FP16_MAX * self.range_divisor

    def codebook_tensor(self, device="cpu") -> torch.Tensor:
        """The codebook as float32 (exactly the C float literals), on `device`."""
        if self.codebook is None:
            raise ValueError(f"format {self.name!r} has a linear grid and no codebook")
        return _codebook_tensor(self.name, str(torch.device(device)))

    def n_blocks(self, shape) -> int:
        numel = 1
        for s in shape:
            numel *= int(s)
        return numel // self.block_size


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q8_0", 8, "Q8_0", 32, 34, 0, None, 127.0,
                    "8-bit linear, absmax scale (ggml Q8_0)"),
        QuantFormat("q4_0", 2, "Q4_0", 32, 18, 0, None, 8.0,
                    "4-bit linear, signed-max scale (ggml Q4_0)"),
        QuantFormat("iq4_nl", 20, "IQ4_NL", 32, 18, 0, IQ4_NL_VALUES, 100.0,  # scale search: d ~ amax/120
                    "4-bit non-linear grid with ggml's weighted scale search (ggml IQ4_NL)"),
        QuantFormat("rq4", 42, "RQ4", 32, 18, 0, RQ4_CODEBOOK, RQ4_CODEBOOK[-1],
                    "4-bit Beta(127.5,127.5) codebook, absmax scale (Felix fork's RQ4 / BetaQ)", runtime="fork"),
        QuantFormat("tq2_0", 35, "TQ2_0", 256, 66, 64, None, 1.0,
                    "ternary {-1,0,1} x absmax, 2 bits per weight (ggml TQ2_0)", vec_dot_type="q8_k"),
    )
}


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    """Look a format up by name (case-insensitive); ValueError naming the known ones otherwise."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[fmt.lower()]


@functools.lru_cache(maxsize=None)
def _codebook_tensor(name: str, device: str) -> torch.Tensor:
    return torch.tensor(FORMATS[name].codebook, dtype=torch.float32, device=device)
