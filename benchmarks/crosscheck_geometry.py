"""Cross-check lensmat's anisotropy and intrinsic dimension of ``h_0..h_L`` against the `llm-microscope`
package (PyPI 0.0.7: ``calculate_anisotropy_torch``, ``intrinsic_dimension``).

Both read the same held-out tokens of the same model, as ``lensmat linearity`` does: lensmat's
anisotropy from float64 streaming statistics of every token, its intrinsic dimension from the first
``--id-tokens`` tokens kept in a ``LayerSample``; the package's functions from the stacked activations
(anisotropy in float64; ``intrinsic_dimension`` casts to float64 itself), the first ``--id-tokens``
for the intrinsic dimension (the package notebook's ``embs_dict[layer][:4096]``). Prints both per
residual layer, their largest absolute differences and the seconds each side took.

The package's ``intrinsic_dimension`` loops over the points in Python; it runs on one thread here,
where it is ~100x faster than with two threads contending on a small machine.

    pip install --no-deps --target /tmp/llmm llm-microscope==0.0.7
    python benchmarks/crosscheck_geometry.py --site /tmp/llmm --tokens 20000
    python benchmarks/crosscheck_geometry.py --site /tmp/llmm --model smollm2-135m --tokens 20000
"""

from __future__ import annotations

import argparse
import time

import torch
from crosscheck_linearity import load_functions


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default: the bundled reference model)")
    p.add_argument("--site", default="/tmp/llmm", help="folder where llm-microscope was pip-installed with --target")
    p.add_argument("--tokens", type=int, default=20_000, help="held-out tokens (anisotropy)")
    p.add_argument("--id-tokens", type=int, default=4096, help="the first N of them for the intrinsic dimension")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    microscope = load_functions(args.site)
    import lensmat
    from lensmat.analyses.geometry import LayerSample, anisotropy_profile, intrinsic_dimension_profile
    from lensmat.stats.collect import resid_hooks, run_capture, update_stats

    model = lensmat.load_model(args.model, device="cpu")
    heldout = lensmat.tokenized(model, split="heldout")
    hooks = resid_hooks(int(model.cfg.n_layers))
    stats, sample, acts = None, LayerSample(hooks, args.id_tokens), {h: [] for h in hooks}
    for batch in heldout.batches(args.batch_size, args.tokens):
        captured, _ = run_capture(model, batch, hooks)
        stats = update_stats(stats, [hooks], captured, pairs=[()])
        sample.add(captured)
        for h in hooks:
            acts[h].append(captured[h])
    stats = stats[0]
    acts = {h: torch.cat(v) for h, v in acts.items()}

    start = time.perf_counter()
    ours_a = anisotropy_profile(stats)
    ours_id = [float("nan") if v is None else v for v in intrinsic_dimension_profile(sample)]  # None: undefined
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs_a = [microscope.calculate_anisotropy_torch(acts[h].double()) for h in hooks]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    theirs_id = [microscope.intrinsic_dimension(acts[h][: args.id_tokens], "cpu") for h in hooks]
    torch.set_num_threads(threads)
    theirs_s = time.perf_counter() - start

    print(f"model {lensmat.describe(model).name}, {stats.n} held-out tokens (intrinsic dimension: the first "
          f"{sample.n}), d_model {model.cfg.d_model}")
    print(f"{'layer':>5} {'anisotropy':>11} {'microscope':>11} {'|diff|':>9}   {'int. dim':>9} {'microscope':>11} {'|diff|':>9}")
    worst_a = worst_id = 0.0
    for layer, (a, ta, d, td) in enumerate(zip(ours_a, theirs_a, ours_id, theirs_id)):
        worst_a, worst_id = max(worst_a, abs(a - ta)), max(worst_id, abs(d - td))
        print(f"{layer:>5} {a:>11.6f} {ta:>11.6f} {abs(a - ta):>9.2e}   {d:>9.4f} {td:>11.4f} {abs(d - td):>9.2e}")
    print(f"largest |difference|: anisotropy {worst_a:.2e}, intrinsic dimension {worst_id:.2e}")
    print(f"seconds: lensmat {ours_s:.1f}, llm-microscope {theirs_s:.1f}")


if __name__ == "__main__":
    main()
