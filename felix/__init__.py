"""Felix: kernels, codecs and tooling to train Felix-LM v2 to survive its 4-bit deployment.

Public API:

* :func:`quantize` / :func:`dequantize` -- ggml block codecs (rq4, iq4_nl, q4_0, q8_0, tq2_0),
  byte-exact with ggml, with ``reference`` (torch), ``triton`` and ``cpu`` (C++) backends.
* :func:`attention` -- fused causal / grouped-query attention (forward + backward), ``reference``
  (torch) and ``triton`` backends.
* :func:`linear_ce_quail` / :class:`LinearCEQuail` -- fused linear cross-entropy + QUAIL margin hinge
  (+ z-loss), chunked so the N x V logits never exist (``reference`` chunked torch, ``triton``).
* :func:`lowrank_linear` -- SpliceCore low-rank add fused into the main GEMM (``reference``, ``triton``);
  :mod:`felix.model.splice` holds the SpliceCore modules and the name-based API.
* :func:`spoke_residual` -- the fork's gated low-rank spoke residual, SiLU bottleneck fused (``reference``,
  ``triton``); :mod:`felix.model.spokes` holds the spoke modules, hub freezing and spoke files.
* :func:`quant_matmul` / :class:`QuantLinear` / :func:`quantize_model_linears` -- W4A16 matmul on
  4-bit blocks (rq4, iq4_nl, q4_0) decoded in the kernel (reference, triton, hip backends).
* :func:`backends` -- which backends run on this machine, and why not where they do not.
* :data:`FORMATS` / :func:`get_format` -- the format table (block sizes, ggml ids, codebooks).
"""

from felix.core.formats import FORMATS, QuantFormat, get_format
from felix.ops.dispatch import backends
from felix.ops.attention import attention
from felix.ops.codecs import dequantize, quantize
from felix.ops.loss import LinearCEQuail, linear_ce_quail
from felix.ops.lowrank import lowrank_linear
from felix.ops.spoke import spoke_residual
from felix.ops.qmatmul import quant_matmul
from felix.model.quant_linear import QuantLinear, quantize_model_linears

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "QuantFormat",
    "get_format",
    "backends",
    "quantize",
    "dequantize",
    "__version__",
    "attention",
    "quant_matmul",
    "QuantLinear",
    "quantize_model_linears",
    "linear_ce_quail",
    "LinearCEQuail",
    "lowrank_linear",
    "spoke_residual",
]
