"""GPU tier: runs only where torch sees a CUDA or ROCm device (skipped cleanly elsewhere).

The Triton codecs on real hardware must write the reference's exact bytes (they are launched
without FMA contraction) and decode to finite values.
"""

import pytest
import torch

import felix
from felix.core.formats import FORMATS, get_format

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(1, 256), (37, 768), (1024, 4096), (3, 5, 2816)])
def test_triton_codecs_on_gpu_match_the_reference(fmt, shape, gen):
    if shape[-1] % get_format(fmt).block_size:
        pytest.skip("row not a whole number of blocks")
    x = (torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=gen))).cuda()
    got = felix.quantize(x, fmt, backend="triton")
    want = felix.quantize(x.cpu(), fmt, backend="reference")
    assert torch.equal(got.cpu(), want)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = felix.dequantize(got, fmt, shape, dtype=dtype, backend="triton")
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert torch.equal(y.cpu(), felix.dequantize(want, fmt, shape, dtype=dtype, backend="reference"))


def test_automatic_dispatch_picks_triton_on_gpu():
    from felix.ops.dispatch import resolve_backend

    assert resolve_backend("quantize", None, torch.device("cuda")) == "triton"
