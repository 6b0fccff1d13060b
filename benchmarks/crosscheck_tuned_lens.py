"""Cross-check lensmat's tuned lens against the `tuned-lens` package (PyPI 0.2.0).

Both are trained on the same train-split batches of the same Hugging Face model with the same
recipe (SGD-Nesterov 0.9, lr decaying linearly to 0, weight decay 1e-3, clip 1.0, loss
Σ_l KL(p_final ‖ p_lens)) for the same number of tokens, then scored on the same held-out
tokens. Prints the per-layer held-out KL of both (nats/token).

The package is not a lensmat dependency. Install it beside lensmat without its heavy extras:

    pip install --no-deps --target /tmp/tlsite tuned-lens==0.2.0 simple-parsing flatten-dict docstring-parser
    PYTHONPATH=/tmp/tlsite python benchmarks/crosscheck_tuned_lens.py --tokens 100000

Its TransformerLens integration touches `transformer_lens.HookedTransformer`, which TransformerLens
4 removed, so it is switched off (`model_surgery._transformer_lens_available = False`); its
training script imports a removed torchdata API, so this script drives its `TunedLens` itself.
The package's lens is scored after a round trip through its own `save` and lensmat's
`TunedLens.load`, so the check covers the loader of published lenses too.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: the bundled reference model)")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args()

    import tuned_lens.model_surgery as surgery

    surgery._transformer_lens_available = False
    from transformers import AutoModelForCausalLM
    from tuned_lens.nn import TunedLens as PackageTunedLens

    import lensmat
    from lensmat.lenses.metrics import evaluate_lenses
    from lensmat.models import reference_model_path
    from lensmat.lenses.tuned import TunedLensTraining, train_tuned_lens

    torch.manual_seed(0)
    path = args.model or str(reference_model_path())
    bridge = lensmat.load_model(path, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    for param in hf.parameters():
        param.requires_grad_(False)
    train = lensmat.tokenized(bridge, split="train")
    heldout = lensmat.tokenized(bridge, split="heldout")
    L = int(bridge.cfg.n_layers)
    config = TunedLensTraining(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr)

    ours = train_tuned_lens(bridge, train, config)

    theirs = PackageTunedLens.from_model(hf)
    opt = torch.optim.SGD(theirs.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    n_steps = max(1, math.ceil(args.tokens / (train.n_tokens() / len(train.seqs) * args.batch_size)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / n_steps))
    seen = 0
    while seen < args.tokens:
        for batch in train.batches(args.batch_size, args.tokens - seen):
            mask = batch.score_mask
            with torch.no_grad():
                out = hf(batch.tokens, output_hidden_states=True)
                logp = out.logits[mask].log_softmax(-1)
            loss = sum((logp.exp() * (logp - theirs(out.hidden_states[l][mask], l).log_softmax(-1))).sum(-1).mean()
                       for l in range(L))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            opt.step()
            sched.step()
            seen += batch.n_scored

    with tempfile.TemporaryDirectory() as folder:  # the package's own saved format, read by lensmat's loader
        theirs.save(folder)
        package = lensmat.TunedLens.load(folder, bridge)
    scores, _, n = evaluate_lenses(bridge, {"lensmat": ours, "package": package, "logit": lensmat.LogitLens(bridge)},
                                   heldout.batches(args.batch_size, args.eval_tokens), progress=False)
    print(f"held-out KL(p_final || p_lens), nats/token, {n} tokens; both trained on {args.tokens} tokens")
    print(f"{'layer':>5} {'logit':>8} {'lensmat tuned':>14} {'package tuned':>14} {'|diff|':>9}")
    for layer in range(L + 1):
        a, b = scores["lensmat"]["kl"][layer], scores["package"]["kl"][layer]
        print(f"{layer:>5} {scores['logit']['kl'][layer]:>8.4f} {a:>14.6f} {b:>14.6f} {abs(a - b):>9.1e}")
    gap = max((ours.W[l] - theirs[l].weight.T).abs().max().item() for l in range(L))  # ours: h @ W; nn.Linear: h @ Wᵀ
    print(f"largest |W_lensmat − W_package| over layers: {gap:.1e} (both start at zero)")


if __name__ == "__main__":
    main()
