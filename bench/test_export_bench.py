"""GGUF export benchmarks: felix-300m (random init, the real shapes) to every deployment format on this CPU.

"felix" (the candidate) is `felix.ship.export.export_gguf`: the per-tensor policy, Felix's C++ codecs, gguf-py's
writer, the atomic rename. The peer is what llama.cpp's own convert_hf_to_gguf.py does for the same tensors and
the same per-tensor policy: gguf-py's numpy quantizers (`gguf.quants.quantize`) and a plain `gguf.GGUFWriter`
(peers exist for q8_0, q4_0 and tq2_0; gguf-py has no IQ4_NL quantizer and no RQ4). Each case's extra_info holds
the split of Felix's time into prepare / quantize / write, the file size and bits per weight. Goal (reported, not
asserted): felix-300m to RQ4 in <= 30 s on a 2-core CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)
from felix.model import felix_lm as M
from felix.data.corpus import builtin_corpus
from felix.ship.export import base_tensors, export_gguf
from felix.ops.quant_policy import plan_tensor_types, tensor_nbytes
from felix.model.tokenizer import train_tokenizer

PRESET = "tiny" if QUICK else "felix-300m"
CASES = [("rq4", "felix"), ("iq4_nl", "llama"), ("q4_0", "llama"), ("tq2_0", "llama"), ("q8_0", "llama")]
GGUF_PY_PEERS = {"q8_0", "q4_0", "tq2_0"}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    cfg = M.preset(PRESET)
    model = M.FelixLM(cfg).eval()
    with torch.no_grad():  # give the splice up-projections (zero at init) values, so merging them is real work
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.normal_(0, 0.02)
    tok = train_tokenizer(builtin_corpus(400, seed=0), 1024)  # padded to the model's 32K rows in the file
    return model, tok


def export_with_gguf_py(model, quant: str, out: str) -> None:
    """The peer: convert_hf_to_gguf.py's path (numpy quantizers, plain GGUFWriter) for the same tensors/policy."""
    import gguf

    tensors = base_tensors(model, "merge")
    writer = gguf.GGUFWriter(out, "llama")
    for choice in plan_tensor_types({k: tuple(v.shape) for k, v in tensors.items()}, quant):
        data = tensors[choice.name].float().numpy()
        qtype = gguf.GGMLQuantizationType[choice.type.upper()]
        writer.add_tensor(
            choice.name,
            gguf.quants.quantize(data, qtype) if choice.type != "f32" else data,
            raw_dtype=qtype if choice.type != "f32" else None,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("quant,arch", CASES, ids=[q for q, _ in CASES])
@pytest.mark.parametrize("impl", ["felix", "gguf-py-numpy"])
def test_export(measure, benchmark, tmp_path, model_and_tokenizer, impl, quant, arch):
    if impl == "gguf-py-numpy" and quant not in GGUF_PY_PEERS:
        pytest.skip(f"gguf-py has no {quant} quantizer")
    model, tok = model_and_tokenizer
    out = str(tmp_path / f"model-{quant}.gguf")
    n_params = sum(p.numel() for p in model.parameters())
    shapes = {k: tuple(v.shape) for k, v in base_tensors(model, "merge").items()}
    stored_bytes = sum(tensor_nbytes(c.shape, c.type) for c in plan_tensor_types(shapes, quant))
    results = []

    def run():
        if os.path.exists(out):
            os.remove(out)
        if impl == "felix":
            results.append(export_gguf(PRESET, out, arch=arch, quant=quant, model=model, tokenizer=tok))
        else:
            export_with_gguf_py(model, quant, out)

    def extra():
        info = {"file_mb": os.path.getsize(out) / 2**20}
        if results:  # Felix's own split of the time (the last run)
            r = results[-1]
            info.update(
                prepare_s=r.seconds_prepare,
                quantize_s=r.seconds_quantize,
                write_s=r.seconds_write,
                bits_per_weight=r.bits_per_weight,
            )
        return info

    # bytes moved: the fp32 weights read once, the tensors as stored written once
    measure(
        torch.device("cpu"),
        f"export {PRESET} {quant}",
        impl,
        run,
        rounds=1,
        bytes_moved=4.0 * n_params + stored_bytes,
        candidate=impl == "felix",
        extra=extra,
    )
    # the file holds what the policy says, whichever writer made it (a benchmark that checks what it timed)
    assert stored_bytes <= os.path.getsize(out) < stored_bytes + (8 << 20)
    benchmark.extra_info.update(extra())
