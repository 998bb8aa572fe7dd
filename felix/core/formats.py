"""The block-quantization formats Felix reads and writes: one table, the single source of truth.

Every codec backend (the torch reference, the Triton kernels, the C++ extension) takes its block
geometry (weights and bytes per block, scale and index offsets, index packing), codebook, runtime (stock
llama.cpp or only the fork) and llama file type from here, and so do quant_matmul, QuantLinear, the export
policy, the exporter's general.file_type and the CLI; RUNTIME_TYPES, FILE_TYPES and the test grids are derived
from it. Tests check this table against gguf-py's constants and dequantizers and the C++ extension's
compiled-in layout, so a typo anywhere fails loudly. Adding a format: docs/contributing.md.

Byte layouts (little endian, one ggml block each):

=========  =====  =====  ====================================================================
format     block  bytes  layout (packing: see PACKINGS)
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
# Four entries a row, as in the C table (kept out of ruff format).
# fmt: off
RQ4_CODEBOOK = (
    -0.12281943, -0.08296703, -0.06342665, -0.04873108,
    -0.03634204, -0.02524078, -0.01488395, -0.00492020,
    0.00492020, 0.01488395, 0.02524078, 0.03634204,
    0.04873108, 0.06342665, 0.08296703, 0.12281943,
)
# fmt: on

FP16_MAX = 65504.0
SCALE_BYTES = 2  # every format's block scale is one little-endian fp16

# How a block's quant indices sit in its bytes (the "nibble order"); every codec and kernel reads it from here.
PACKINGS = {
    "int8": "one signed byte per weight, in order",
    "halves": "4-bit: byte j = q[j] | q[j + block/2] << 4 (low nibbles: the first half of the block)",
    "pairs": "4-bit: byte j = q[2j] | q[2j + 1] << 4 (neighbours share a byte)",
    "crumbs": "2-bit: element (4 * stride) c + stride l + m in byte stride c + m, bits 2l..2l+1",
}

# llama_ftype (llama.h) of the float export types; the block formats carry theirs in the table below
FLOAT_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}


@dataclass(frozen=True)
class QuantFormat:
    """Geometry of one ggml block format."""

    name: str  # Felix's name, as accepted by felix.quantize
    ggml_type: int  # enum ggml_type value
    ggml_name: str  # name in gguf-py / ggml
    block_size: int  # weights per block
    bytes_per_block: int  # bytes per block, scale included
    scale_offset: int  # byte offset of the fp16 scale inside a block
    qs_offset: int  # byte offset of the packed quant indices inside a block
    packing: str  # one of PACKINGS: which element each index bits hold
    index_bits: int  # bits per quant index
    codebook: tuple | None  # index -> value in units of the scale; None for linear grids
    range_divisor: float  # |d| <= amax / range_divisor for every block (bounds the input range)
    description: str
    # ggml CPU's vec_dot_type: what a matmul against this weight type rounds its activations to first
    # (felix.ops.activation_rounding models it for the fidelity harness's simulated path)
    vec_dot_type: str = "q8_0"
    runtime: str = "stock"  # "stock": stock llama.cpp runs it; "fork": only the Felix llama.cpp fork does
    llama_file_type: int | None = None  # llama_ftype (llama.h) of a file mostly in this type; None: not public
    crumb_stride: int = 0  # "crumbs" packing: bytes per group of 4 * stride weights (0 for other packings)

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"{self.name}: unknown packing {self.packing!r}; known: {', '.join(PACKINGS)}")
        if self.qs_bytes * 8 != self.block_size * self.index_bits:
            raise ValueError(
                f"{self.name}: {self.qs_bytes} index bytes cannot hold {self.block_size} {self.index_bits}-bit indices"
            )
        scale, qs = (
            set(range(*self.scale_slice.indices(self.bytes_per_block))),
            set(range(*self.qs_slice.indices(self.bytes_per_block))),
        )
        if scale & qs or len(scale | qs) != self.bytes_per_block:
            raise ValueError(f"{self.name}: scale and index bytes must tile the {self.bytes_per_block}-byte block")

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block_size

    @property
    def qs_bytes(self) -> int:
        """Bytes of packed indices per block."""
        return self.bytes_per_block - SCALE_BYTES

    @property
    def scale_slice(self) -> slice:
        """The fp16 scale's bytes inside a block."""
        return slice(self.scale_offset, self.scale_offset + SCALE_BYTES)

    @property
    def qs_slice(self) -> slice:
        """The packed indices' bytes inside a block."""
        return slice(self.qs_offset, self.qs_offset + self.qs_bytes)

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
        QuantFormat(
            "q8_0",
            ggml_type=8,
            ggml_name="Q8_0",
            block_size=32,
            bytes_per_block=34,
            scale_offset=0,
            qs_offset=2,
            packing="int8",
            index_bits=8,
            codebook=None,
            range_divisor=127.0,
            description="8-bit linear, absmax scale (ggml Q8_0)",
            llama_file_type=7,
        ),
        QuantFormat(
            "q4_0",
            ggml_type=2,
            ggml_name="Q4_0",
            block_size=32,
            bytes_per_block=18,
            scale_offset=0,
            qs_offset=2,
            packing="halves",
            index_bits=4,
            codebook=None,
            range_divisor=8.0,
            description="4-bit linear, signed-max scale (ggml Q4_0)",
            llama_file_type=2,
        ),
        QuantFormat(
            "iq4_nl",
            ggml_type=20,
            ggml_name="IQ4_NL",
            block_size=32,
            bytes_per_block=18,
            scale_offset=0,
            qs_offset=2,
            packing="halves",
            index_bits=4,
            codebook=IQ4_NL_VALUES,
            range_divisor=100.0,  # scale search: d ~ amax/120
            description="4-bit non-linear grid with ggml's weighted scale search (ggml IQ4_NL)",
            llama_file_type=25,
        ),
        QuantFormat(
            "rq4",
            ggml_type=42,
            ggml_name="RQ4",
            block_size=32,
            bytes_per_block=18,
            scale_offset=0,
            qs_offset=2,
            packing="pairs",
            index_bits=4,
            codebook=RQ4_CODEBOOK,
            range_divisor=RQ4_CODEBOOK[-1],
            description="4-bit Beta(127.5,127.5) codebook, absmax scale (Felix fork's RQ4 / BetaQ)",
            runtime="fork",
        ),
        QuantFormat(
            "tq2_0",
            ggml_type=35,
            ggml_name="TQ2_0",
            block_size=256,
            bytes_per_block=66,
            scale_offset=64,
            qs_offset=0,
            packing="crumbs",
            index_bits=2,
            codebook=None,
            range_divisor=1.0,
            description="ternary {-1,0,1} x absmax, 2 bits per weight (ggml TQ2_0)",
            vec_dot_type="q8_k",
            llama_file_type=37,
            crumb_stride=32,
        ),
    )
}

RUNTIMES = ("stock", "fork")
# The formats each llama.cpp runtime can run: stock llama.cpp its own, the fork (a superset) every one
RUNTIME_TYPES: dict[str, tuple[str, ...]] = {
    "stock": tuple(n for n, f in FORMATS.items() if f.runtime == "stock"),
    "fork": tuple(FORMATS),
}
# llama_ftype (general.file_type) per export type; the fork-only formats have no public one and are left out
FILE_TYPES: dict[str, int] = {
    **FLOAT_FILE_TYPES,
    **{n: f.llama_file_type for n, f in FORMATS.items() if f.llama_file_type is not None},
}
# The largest block: a row length that every format divides
LARGEST_BLOCK = max(f.block_size for f in FORMATS.values())


def formats_with_packing(*packings: str) -> tuple[str, ...]:
    """The names of the formats whose indices are packed one of `packings` ways, in table order."""
    return tuple(n for n, f in FORMATS.items() if f.packing in packings)


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
