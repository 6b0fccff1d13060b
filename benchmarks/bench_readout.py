"""Benchmark: lens evaluation through the readout engine against its measured floor and a plain loop.

On the same held-out batches, in one process, with the maps fitted before any clock starts:

  forward   plain forward passes (``model(tokens)``);
  floor     the forward plus the same unembedding GEMMs alone: one ``[n, d] @ [d, V]`` per layer and
            lens and batch (every layer, both lenses), outputs discarded;
  evaluate  ``lensmat.evaluate_lenses`` (logit + mat, every layer 0..L, all metrics);
  plain     the readout as a researcher writes it with the bridge: ``run_with_cache``, then per layer and
            lens ``log_softmax(unembed(ln_final(h)))``, argmax and KL against the model.

Each step is timed ``--repeats`` times and the fastest kept. Prints evaluate ÷ floor, evaluate ÷ plain,
tokens/s and the process's peak RSS after each step (the steps run in the order above, so the peak
after ``evaluate`` covers loading, forward and evaluation).
With ``--profile`` it also prints where evaluation's time goes (torch.profiler, top operators).

    python benchmarks/bench_readout.py --eval-tokens 5000
    python benchmarks/bench_readout.py --model smollm2-135m --eval-tokens 1000
"""

from __future__ import annotations

import argparse
import resource
import time

from machine import machine


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` runs, in seconds (the others are this shared machine's noise)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import torch

    import lensmat
    from lensmat.stats.collect import resid_hooks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--eval-tokens", type=int, default=5000)
    p.add_argument("--fit-tokens", type=int, default=20_000, help="train tokens for the mat maps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="time each step this many times and keep the fastest")
    p.add_argument("--skip-plain", action="store_true", help="leave out the plain loop (slow at large vocabularies)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    model = lensmat.load_model(args.model, device="cpu")
    L, V, d = int(model.cfg.n_layers), int(model.cfg.d_vocab), int(model.cfg.d_model)
    print(f"{machine()}; model: {args.model or 'reference'} ({L} blocks, d_model {d}, d_vocab {V}), "
          f"{torch.get_num_threads()} threads, batch {args.batch_size} lines")
    lenses = {"logit": lensmat.LogitLens(model),
              "mat": lensmat.MatLens(model, lensmat.fit_maps(model, max_fit_tokens=args.fit_tokens, progress=False))}
    batches = list(lensmat.tokenized(model, split="heldout").batches(args.batch_size, args.eval_tokens))
    n = sum(b.n_scored for b in batches)
    hooks = resid_hooks(L)

    @torch.no_grad()
    def forward():
        for b in batches:
            model(b.tokens)

    @torch.no_grad()
    def gemms():
        W = model.W_U
        for b in batches:
            x = torch.randn(b.n_scored, d, dtype=W.dtype)
            for _ in range((L + 1) * len(lenses)):
                x @ W

    def evaluate():
        return lensmat.evaluate_lenses(model, lenses, batches, progress=False)

    @torch.no_grad()
    def plain():
        for b in batches:
            logits, cache = model.run_with_cache(b.tokens, names_filter=lambda name: name in hooks)
            mask = b.score_mask
            logp = torch.log_softmax(logits[mask].float(), -1)
            for lens in lenses.values():
                for layer, hook in enumerate(hooks):
                    logq = torch.log_softmax(model.unembed(model.ln_final(lens.transform_hidden(cache[hook], layer)))[mask].float(), -1)
                    logq.argmax(-1)
                    (logp.exp() * (logp - logq)).sum(-1).mean()

    forward()  # warm-up
    t_fwd = timed(forward, args.repeats)
    t_gemm = timed(gemms, args.repeats)
    floor = t_fwd + t_gemm
    print(f"\n{n} held-out tokens; {(L + 1) * len(lenses)} readouts per token (logit + mat at layers 0..{L})")
    print(f"forward   {t_fwd:8.2f} s   peak RSS {rss_mb():7.0f} MB")
    print(f"GEMMs     {t_gemm:8.2f} s   ({(L + 1) * len(lenses) * n * d * V / t_gemm / 1e9:.0f} G multiply-adds/s)")
    print(f"floor     {floor:8.2f} s")
    t_eval = timed(evaluate, args.repeats)
    print(f"evaluate  {t_eval:8.2f} s   peak RSS {rss_mb():7.0f} MB   {n / t_eval:8.1f} tokens/s   "
          f"evaluate/floor = {t_eval / floor:.2f} (target <= 1.3)")
    if not args.skip_plain:
        t_plain = timed(plain, args.repeats)
        print(f"plain     {t_plain:8.2f} s   peak RSS {rss_mb():7.0f} MB   evaluate/plain = {t_eval / t_plain:.2f} "
              "(target <= 0.6)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            evaluate()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=36))


if __name__ == "__main__":
    main()
