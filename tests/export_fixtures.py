"""A small Felix checkpoint for the exporter tests: a trained byte-level BPE tokenizer and a random model whose
every tensor is drawn fresh (splices included: B != 0, gates != 1), with rows of 256 so every format applies."""

from __future__ import annotations

import torch

from felix.data.corpus import builtin_corpus
from felix.model.felix_lm import FelixConfig, FelixLM, save_checkpoint
from felix.model.tokenizer import train_tokenizer

VARIED_TEXTS = [
    'Plain words, then JSON: {"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "none": null}',
    "whitespace   runs\t\ttabs\n\n\nnewlines    and trailing spaces   ",
    "unicode: naïve café Ünïcödé — “quotes” ‘single’ ½ ∑ π, 日本語のテキスト, 한국어, emoji 🙂🚀",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F",
    '<|system|>You answer in JSON.<|end|><|user|>Is it safe?<|end|><|assistant|>{"refuse": false}<|end|>',
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "",
]


def make_checkpoint(
    directory,
    seed: int,
    d_model: int = 256,
    n_layer: int = 2,
    vocab_size: int = 1024,
    splice_projections=("attn_q", "ffn_down"),
    train_steps: int = 0,
):
    """`train_steps` > 0: a few AdamW steps on the built-in corpus first, so that predictions are peaked (the
    greedy path of a random model runs through near-ties that either runtime may break)."""
    g = torch.Generator().manual_seed(seed)
    texts = builtin_corpus(300, seed=seed)
    tok = train_tokenizer(texts, vocab_size)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=n_layer,
        d_model=d_model,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=2 * d_model,
        max_seq_len=128,
        splice_layers=[n_layer - 1],
        splice_projections=list(splice_projections),
        init_std=0.08,
    )
    model = FelixLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(".gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    if train_steps:
        ids = torch.tensor([i for t in texts[:100] for i in tok.encode(t)])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=g).tolist()
            rows = torch.stack([ids[s : s + 65] for s in starts])
            model.loss(rows[:, :-1], rows[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
    return save_checkpoint(directory, model, tok), model, tok
