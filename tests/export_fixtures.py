"""A small Felix checkpoint for the exporter tests: a trained byte-level BPE tokenizer and a random model whose
every tensor is drawn fresh (splices included: B != 0, gates != 1), with rows of 256 so every format applies."""
from __future__ import annotations

import torch

from felix.data import builtin_corpus
from felix.model import FelixConfig, FelixLM, save_checkpoint
from felix.tokenizer import train_tokenizer

VARIED_TEXTS = [
    'Plain words, then JSON: {"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "none": null}',
    "whitespace   runs\t\ttabs\n\n\nnewlines    and trailing spaces   ",
    "unicode: naïve café Ünïcödé — “quotes” ‘single’ ½ ∑ π, 日本語のテキスト, 한국어, emoji 🙂🚀",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F",
    "<|system|>You answer in JSON.<|end|><|user|>Is it safe?<|end|><|assistant|>{\"refuse\": false}<|end|>",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "",
]


def make_checkpoint(directory, seed: int, d_model: int = 256, n_layer: int = 2, vocab_size: int = 1024,
                    splice_projections=("attn_q", "ffn_down"), per_output_gate: bool = False):
    g = torch.Generator().manual_seed(seed)
    tok = train_tokenizer(builtin_corpus(300, seed=seed), vocab_size)
    cfg = FelixConfig(vocab_size=tok.vocab_size, n_layer=n_layer, d_model=d_model, n_head=4, n_kv_head=2,
                      ffn_hidden=2 * d_model, max_seq_len=128, splice_layers=[n_layer - 1],
                      splice_projections=list(splice_projections), init_std=0.08)
    model = FelixLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(".gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return save_checkpoint(directory, model, tok), model, tok
