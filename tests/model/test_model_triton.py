"""The tiny Felix-LM with felix.attention's Triton kernels (interpreter) vs its torch reference backend:
same logits, same loss, same gradients for every parameter. fp32 (bf16 is wrong in the interpreter)."""

import torch


def backend_differences(seed: int):
    """Runs in the interpreter worker: max |triton - reference| of logits and of each parameter's gradient,
    relative to the largest |reference| value."""
    from felix.model import felix_lm as M

    torch.manual_seed(seed)
    cfg = M.FelixConfig(vocab_size=96, n_layer=4, d_model=64, n_head=2, n_kv_head=1, ffn_hidden=96, max_seq_len=32)
    model = M.FelixLM(cfg)
    with torch.no_grad():  # give the splice a non-zero B so its gradients are exercised too
        model.blk[3].splice["ffn_down"].b.normal_(0, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (2, 21))
    whitelist = torch.tensor([3, 5, 7, 11])
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        logits = model(tokens[:, :-1], attention_backend=backend)
        parts = model.loss(tokens[:, :-1], tokens[:, 1:], whitelist, 1.0, 0.5, attention_backend=backend)
        parts.loss.backward()
        results[backend] = (
            logits.detach(),
            float(parts.loss.detach()),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    ref, tri = results["reference"], results["triton"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    grads = {n: rel(tri[2][n], ref[2][n]) for n in ref[2]}
    return rel(tri[0], ref[0]), abs(tri[1] - ref[1]), grads


def test_tiny_model_triton_matches_reference(interpret, seed):
    logits_err, loss_err, grad_errs = interpret(backend_differences, seed)
    assert logits_err < 1e-4 and loss_err < 1e-4, (logits_err, loss_err)
    worst = max(grad_errs, key=grad_errs.get)
    print(
        f"tiny model triton vs reference: logits rel {logits_err:.2e}, loss abs {loss_err:.2e}, worst grad rel "
        f"{grad_errs[worst]:.2e} ({worst})"
    )
    assert grad_errs[worst] < 1e-3, (worst, grad_errs[worst])
    assert (
        len(grad_errs) == 4 * 9 + 2 + 3
    )  # 4 blocks x (2 norms + 7 projections), embedding, final norm, splice a/b/gate
