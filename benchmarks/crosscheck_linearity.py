"""Cross-check lensmat's streamed linearity scores against the `llm-microscope` package (PyPI 0.0.7).

Both score the same held-out tokens of the same model: lensmat from its float64 streaming
statistics, llm-microscope's ``procrustes_similarity`` from the stacked activations (float64).
The residual-removed variant is ``procrustes_similarity(h_l, h_{l+1} − h_l)``: the package's own
``procrustes_similarity_centered`` returns the ``float`` type itself instead of a number.
Prints both per block and their largest absolute difference.

The package is not a lensmat dependency, and its ``__init__`` does ``from logit_lens import *``
(an absolute import that fails once installed), so this script loads its ``functions.py`` by path:

    pip install --no-deps --target /tmp/llmm llm-microscope==0.0.7
    python benchmarks/crosscheck_linearity.py --site /tmp/llmm --tokens 5000
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch


def load_functions(site: str):
    path = Path(site) / "llm_microscope" / "functions.py"
    if not path.exists():
        raise SystemExit(f"{path} not found; install it with: pip install --no-deps --target {site} llm-microscope==0.0.7")
    spec = importlib.util.spec_from_file_location("llm_microscope_functions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default: the bundled reference model)")
    p.add_argument("--site", default="/tmp/llmm", help="folder where llm-microscope was pip-installed with --target")
    p.add_argument("--tokens", type=int, default=5_000, help="held-out tokens (must exceed d_model)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    microscope = load_functions(args.site)
    import lensmat
    from lensmat.stats.collect import collect, resid_hook, resid_hooks, run_capture
    from lensmat.analyses.linearity import linearity_profile

    model = lensmat.load_model(args.model, device="cpu")
    heldout = lensmat.tokenized(model, split="heldout")
    n_layers = int(model.cfg.n_layers)
    hooks = resid_hooks(n_layers)
    stats = collect(model, heldout.batches(args.batch_size, args.tokens), [hooks], progress=False)[0]
    ours = linearity_profile(stats)
    acts = {h: [] for h in hooks}
    for batch in heldout.batches(args.batch_size, args.tokens):
        captured, _ = run_capture(model, batch, hooks)
        for h in hooks:
            acts[h].append(captured[h].double())
    acts = {h: torch.cat(v) for h, v in acts.items()}
    print(f"model {lensmat.describe(model).name}, {stats.n} held-out tokens, d_model {model.cfg.d_model}")
    print(f"{'block':>5} {'lensmat':>9} {'microscope':>10} {'|diff|':>9}   {'lensmat-nr':>10} {'microscope-nr':>13} {'|diff|':>9}")
    worst = 0.0
    for layer in range(n_layers):
        x, y = acts[resid_hook(layer)], acts[resid_hook(layer + 1)]
        theirs = microscope.procrustes_similarity(x, y)
        theirs_nr = microscope.procrustes_similarity(x, y - x)
        a, b = ours["linearity"][layer], ours["linearity_no_residual"][layer]
        worst = max(worst, abs(a - theirs), abs(b - theirs_nr))
        print(f"{layer:>5} {a:>9.6f} {theirs:>10.6f} {abs(a - theirs):>9.2e}   {b:>10.6f} {theirs_nr:>13.6f} {abs(b - theirs_nr):>9.2e}")
    print(f"largest |difference|: {worst:.2e}")


if __name__ == "__main__":
    main()
