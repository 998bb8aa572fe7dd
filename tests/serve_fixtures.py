"""A tiny Felix checkpoint that has learned the built-in task probes by heart (prompt in Felix's chat format -> the
JSON answer + END), so that greedy decoding gives real task JSON through any path: a few seconds of full-batch
AdamW on a 2 x 64 model with one SpliceCore (its LoRA-adapter export changes the answers). Measured: every probe
reproduced after 60 steps; 80 are taken for margin. One torch thread while training (tiny ops; threads only contend)."""

from __future__ import annotations

import torch

from felix.tasks import records as task_records
from felix.model import chat
from felix.verify.fidelity import builtin_probes
from felix.model.felix_lm import FelixConfig, FelixLM, save_checkpoint
from felix.model.tokenizer import train_tokenizer


def memorized_checkpoint(directory, n_probes: int = 4, steps: int = 80, seed: int = 0):
    """(checkpoint directory, model, tokenizer, probes): the model trained until it reproduces every probe's
    expected answer greedily (asserted in PyTorch, so a test failure later is the runtime's, not the training's)."""
    probes = builtin_probes(n_probes)
    texts = [p.prompt + p.expected for p in probes]
    records = [
        chat.chat_text(r["prompt"], r["response"])
        for r in task_records.structured_records(200, 7, tasks=("encoding", "episode", "principle"))
    ]
    tok = train_tokenizer(records + texts, 1024)  # ~200 tokens per probe: short sequences train fast
    docs = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    width = max(len(d) for d in docs)
    torch.manual_seed(seed)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        d_model=64,
        n_head=2,
        n_kv_head=1,
        ffn_hidden=128,
        max_seq_len=((width + 63) // 64) * 64,
        splice_layers=[1],
        splice_projections=["ffn_down"],
        splice_rank=4,
        init_std=0.05,
    )
    model = FelixLM(cfg)
    inputs = torch.full((len(docs), width - 1), tok.pad_id)
    targets = torch.full((len(docs), width - 1), -100)
    for i, d in enumerate(docs):
        inputs[i, : len(d) - 1] = torch.tensor(d[:-1])
        targets[i, : len(d) - 1] = torch.tensor(d[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            model.loss(inputs, targets).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        for p, d in zip(probes, docs):
            n_prompt = 1 + len(tok.encode(p.prompt))
            logits = model(torch.tensor([d[:-1]]))[0]
            assert (logits[n_prompt - 1 :].argmax(-1) == torch.tensor(d[n_prompt:])).all(), (
                f"the fixture did not learn probe {p.name}: raise `steps`"
            )
    return save_checkpoint(directory, model, tok), model, tok, probes
