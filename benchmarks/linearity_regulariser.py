"""The cosine-regulariser experiment of "Your Transformer is Secretly Linear" at small scale.

Trains two small GPT-2s with `scripts/train_reference_model.py` on the same data, seed and token
budget, one plain and one with the loss term λ·Σ_i (1 − cos(h_i, h_{i−1})) over consecutive
hidden states (Hugging Face's `hidden_states`, whose last entry is after the final LayerNorm),
then reports for each the held-out cross-entropy and top-1 accuracy (from the training script)
and lensmat's linearity profile (with and without the residual) on held-out tokens.

    python benchmarks/linearity_regulariser.py --tokens 1.5e6 --cos-reg 0.1 --out runs/regulariser

Budget: both models share every setting except `--cos-reg`; the defaults (4 blocks, d_model 128,
1.5M tokens each) take a few minutes per model on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def training_script():
    spec = importlib.util.spec_from_file_location("train_reference_model", ROOT / "scripts" / "train_reference_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/regulariser"))
    p.add_argument("--tokens", type=float, default=1.5e6, help="training tokens per model")
    p.add_argument("--cos-reg", type=float, default=0.1, help="λ of the regularised model")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens for the linearity profile")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import lensmat
    from lensmat.analyses.linearity import linearity_profile
    from lensmat.stats.pipeline import collect_layer_stats

    train = training_script()
    rows = {}
    for name, lam in (("baseline", 0.0), (f"cos-reg {args.cos_reg:g}", args.cos_reg)):
        folder = args.out / ("baseline" if lam == 0 else "regularised")
        summary = train.main(["--out", str(folder), "--tokens", str(args.tokens), "--cos-reg", str(lam),
                              "--n-layer", str(args.n_layer), "--d-model", str(args.d_model),
                              "--n-head", str(args.n_head), "--threads", str(args.threads),
                              "--warmup", "100", "--eval-every", "100000"])
        model = lensmat.load_model(str(folder), device="cpu")
        heldout = lensmat.tokenized(model, split="heldout")
        with torch.no_grad():
            stats = collect_layer_stats(model, heldout, max_tokens=args.eval_tokens, progress=False)
        profile = linearity_profile(stats)
        rows[name] = {"heldout_ce": summary["heldout_ce"], "heldout_top1": summary["heldout_top1_accuracy"],
                      "train_minutes": summary["train_minutes"], **profile}
    (args.out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.n_layer} blocks, d_model {args.d_model}, {args.tokens:.3g} training tokens each; "
          f"linearity on {args.eval_tokens} held-out tokens")
    print(f"{'model':>14} {'CE':>6} {'top-1':>6} {'min':>5} {'mean LS':>8} {'mean LS-nr':>10}  per-block LS / LS-nr")
    for name, r in rows.items():
        blocks = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r["linearity"], r["linearity_no_residual"]))
        print(f"{name:>14} {r['heldout_ce']:>6.3f} {r['heldout_top1']:>6.4f} {r['train_minutes']:>5.1f} "
              f"{r['mean']:>8.3f} {r['mean_no_residual']:>10.3f}  {blocks}")


if __name__ == "__main__":
    main()
