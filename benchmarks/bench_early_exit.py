"""Benchmark: real early-exit greedy generation (lensmat.generate) vs the same loop without exits.

For each held-out prompt (the first --prompt-tokens tokens of a line), generate --new-tokens
greedily with the full model, then with early exit under each lens and check (--checks):
"exact" (the confidence rule, one full-vocabulary readout per checked layer) for each λ;
"gated" (an exit probe opens the exact check only where P > gate) for each λ and --gates;
"probe" (exit where the exit probe's P > threshold, one readout per token) for each
--probe-thresholds. The exit probe of each lens is trained on --probe-tokens train tokens.

Prints, per run: seconds (each of --repeats, the full model re-timed in each repeat), wall-clock
speed-up (full seconds / early-exit seconds, the mean over repeats), mean blocks run per generated
token and their fraction of L, full readouts per token, agreement with the full model's tokens
(same token at the same step; after the first disagreement the prefixes differ, so "prefix" also
gives the mean length of the identical prefix), and kept = speed-up ÷ (1 / fraction of blocks run):
how much of the block saving survives as wall-clock (1 = all of it). Tokens after the first are
counted (the first comes from the full prefill). Then, per lens and check, the runs closest to 90%
and 95% agreement.

    python benchmarks/bench_early_exit.py --prompts 40 --lambdas 0.2 0.4 0.6 0.8
    python benchmarks/bench_early_exit.py --model smollm2-135m --prompts 20 --lenses mat --fit-tokens 20000 \\
        --checks exact,gated,probe --probe-tokens 20000 --lambdas 0.6 0.8 0.9 0.95
"""

from __future__ import annotations

import argparse
import time

from machine import machine


def unit_costs(model, lens, probe, prompt, n: int = 200) -> dict:
    """Milliseconds of one full readout (lens + final norm + unembedding + softmax top-2) and one
    exit-probe check (a dot product and a comparison) at batch 1, and of one full-model token."""
    import torch

    from lensmat.analyses.exit_probe import ExitProbe
    from lensmat.analyses.generation import _probe_gate, generate, top_tokens
    from lensmat.lenses import engine

    n_layers = int(model.cfg.n_layers)
    h = model.W_E[prompt[-1]].to(model.W_U.dtype) * 3
    read = engine.Unembedding(model)
    layer = max(1, n_layers // 2)
    out = {}
    with torch.no_grad():
        for _ in range(10):
            top_tokens(read, lens.transform_hidden(h, layer), 2)
        start = time.perf_counter()
        for _ in range(n):
            _, probs = top_tokens(read, lens.transform_hidden(h, layer), 2)
            float(probs[0] - probs[1])
        out["readout_ms"] = 1e3 * (time.perf_counter() - start) / n
        if probe is not None:
            opens = _probe_gate(probe, 0.5, model.W_U.device)
            start = time.perf_counter()
            for _ in range(n):
                opens(h, layer)
            out["probe_ms"] = 1e3 * (time.perf_counter() - start) / n
    generate(model, None, prompt, 4)  # warm-up: the first call is slow
    full = generate(model, None, prompt, 16)
    out["token_ms"] = 1e3 * full["seconds"] / 16
    out["block_ms"] = out["token_ms"] / n_layers
    if probe is not None:  # every token exits at layer 1: 1 block, L-1 key/value fills, 1 readout
        always = ExitProbe(torch.zeros_like(probe.W), torch.full_like(probe.b, 30.0), probe.meta)
        early = generate(model, lens, prompt, 16, check="probe", probe=always, gate=0.5)
        out["exit1_ms"] = 1e3 * early["seconds"] / 16
        out["fill_ms"] = (out["exit1_ms"] - out["block_ms"] - out["readout_ms"]) / (n_layers - 1)
    return out


def main() -> None:
    import torch

    import lensmat
    from lensmat.analyses.exit_probe import train_exit_probe
    from lensmat.analyses.generation import generate
    from lensmat.stats.pipeline import tokenized

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--lenses", default="logit,mat")
    p.add_argument("--fit-tokens", type=int, default=200_000, help="train tokens for the mat maps")
    p.add_argument("--checks", default="exact", help="comma-separated: exact, gated, probe")
    p.add_argument("--probe-tokens", type=int, default=20_000, help="train tokens for each lens's exit probe")
    p.add_argument("--gates", type=float, nargs="+", default=[0.3, 0.5], help="gated: probe gates")
    p.add_argument("--probe-thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95],
                   help="probe: exit thresholds")
    p.add_argument("--repeats", type=int, default=1, help="times each run (and the full model) is timed")
    args = p.parse_args()
    checks = args.checks.split(",")
    if set(checks) - {"exact", "gated", "probe"}:
        p.error(f"--checks: unknown {sorted(set(checks) - {'exact', 'gated', 'probe'})}")

    torch.manual_seed(0)
    model = lensmat.load_model(args.model, device="cpu")
    n_layers = int(model.cfg.n_layers)
    print(f"{machine()}; model: {args.model or 'reference'} ({n_layers} blocks, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab})")
    lenses = {}
    for name in args.lenses.split(","):
        lenses[name] = (lensmat.LogitLens(model) if name == "logit" else
                        lensmat.MatLens(model, lensmat.fit_maps(model, max_fit_tokens=args.fit_tokens, progress=False)))
    probes = {}
    if {"gated", "probe"} & set(checks):
        for name, lens in lenses.items():
            start = time.perf_counter()
            probes[name] = train_exit_probe(model, lens, None, max_tokens=args.probe_tokens, progress=False)
            acc = [a for a in probes[name].meta["train_balanced_accuracy"] if a is not None]
            print(f"exit probe ({name}): {probes[name].meta['n_tokens']} train tokens, {time.perf_counter() - start:.0f} s, "
                  f"train balanced accuracy {min(acc):.3f}–{max(acc):.3f} over layers 1..{n_layers - 1}")
    prompts = [s[: args.prompt_tokens] for s in tokenized(model, None, "heldout").seqs
               if len(s) >= args.prompt_tokens][: args.prompts]
    n_mean = args.prompt_tokens + args.new_tokens / 2
    first = next(iter(lenses))
    costs = unit_costs(model, lenses[first], probes.get(first), prompts[0])  # also the warm-up
    print(f"batch-1 costs ({first} lens): full-model token {costs['token_ms']:.2f} ms = {costs['block_ms']:.2f} ms/block; "
          f"one full readout {costs['readout_ms']:.2f} ms ({costs['readout_ms'] / costs['block_ms']:.2f} blocks)"
          + (f"; one probe check {1e3 * costs['probe_ms']:.1f} µs" if "probe_ms" in costs else ""))
    if "exit1_ms" in costs:
        print(f"a token exiting at layer 1: {costs['exit1_ms']:.2f} ms = {costs['exit1_ms'] / costs['token_ms']:.2f} of a "
              f"full token; a skipped block's key/value fill ≈ {costs['fill_ms']:.2f} ms "
              f"({costs['fill_ms'] / costs['block_ms']:.2f} blocks)")

    runs = [(name, "exact", lam, None) for name in lenses for lam in args.lambdas] if "exact" in checks else []
    runs += [(name, "gated", lam, g) for name in lenses for lam in args.lambdas for g in args.gates] if "gated" in checks else []
    runs += [(name, "probe", None, g) for name in lenses for g in args.probe_thresholds] if "probe" in checks else []
    full_s, seconds, results = [], {run: [] for run in runs}, {}
    for _ in range(args.repeats):
        full = [generate(model, None, pr, args.new_tokens) for pr in prompts]
        full_s.append(sum(r["seconds"] for r in full))
        for run in runs:
            name, check, lam, gate = run
            kw = {} if check == "exact" else {"check": check, "probe": probes[name], "gate": gate}
            out = [generate(model, lenses[name], pr, args.new_tokens, lam=lam, n_mean=n_mean, **kw) for pr in prompts]
            seconds[run].append(sum(r["seconds"] for r in out))
            results[run] = out
    n_tok = len(prompts) * args.new_tokens
    print(f"full model: {' / '.join(f'{s:.2f}' for s in full_s)} s for {len(prompts)} × {args.new_tokens} tokens "
          f"({n_tok / min(full_s):.0f} tokens/s); {n_layers} blocks/token, 1 readout/token")
    print(f"{'lens':<6} {'check':<6} {'lambda':>6} {'gate':>5} {'seconds':>13} {'speed-up':>9} {'blocks/token':>13} "
          f"{'frac':>5} {'readouts':>8} {'agreement':>10} {'prefix':>7} {'kept':>5}")
    rows = []
    for run in runs:
        name, check, lam, gate = run
        out = results[run]
        exits = [e for r in out for e in r["exit_layers"][1:]]
        reads = [x for r in out for x in r["readouts"][1:]]
        same = [a == b for r, f in zip(out, full) for a, b in zip(r["tokens"], f["tokens"])]
        prefix = [next((i for i, (a, b) in enumerate(zip(r["tokens"], f["tokens"])) if a != b), args.new_tokens)
                  for r, f in zip(out, full)]
        speedup = sum(f / s for f, s in zip(full_s, seconds[run])) / len(full_s)
        blocks = sum(exits) / len(exits)
        frac = blocks / n_layers
        row = {"lens": name, "check": check, "lambda": lam, "gate": gate, "speedup": speedup, "frac": frac,
               "agreement": sum(same) / len(same), "kept": speedup * frac}
        rows.append(row)
        print(f"{name:<6} {check:<6} {'-' if lam is None else f'{lam:.2f}':>6} {'-' if gate is None else f'{gate:.2f}':>5} "
              f"{' / '.join(f'{s:.2f}' for s in seconds[run]):>13} {speedup:>9.2f} {blocks:>13.2f} {frac:>5.2f} "
              f"{sum(reads) / len(reads):>8.2f} {row['agreement']:>10.3f} {sum(prefix) / len(prefix):>7.1f} "
              f"{row['kept']:>5.2f}")
    print("operating points (the run closest to each agreement target):")
    for name in lenses:
        for check in checks:
            mine = [r for r in rows if r["lens"] == name and r["check"] == check]
            for target in (0.90, 0.95):
                if mine:
                    r = min(mine, key=lambda r: (abs(r["agreement"] - target), -r["speedup"]))
                    setting = (f"λ {r['lambda']:.2f}" if r["lambda"] is not None else "") + (
                        f"{', ' if r['lambda'] is not None else ''}gate {r['gate']:.2f}" if r["gate"] is not None else "")
                    print(f"  {name:<6} {check:<6} ~{target:.0%}: {setting:<18} agreement {r['agreement']:.3f}, "
                          f"speed-up {r['speedup']:.2f}, blocks run {r['frac']:.2f} (ideal {1 / r['frac']:.2f}×), "
                          f"kept {r['kept']:.2f}")


if __name__ == "__main__":
    main()
