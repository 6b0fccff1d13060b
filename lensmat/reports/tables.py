"""The text tables of the reports: what ``lensmat <command>`` prints, for a notebook too.

One ``format_<command>(report) -> str`` per report the analyses return (:func:`format_table`: one
metric of a compare report per layer); they read only the report, never a model or a folder, so
a report loaded back from ``report.json`` prints the same. A value the report holds as None (not
measured, or undefined) prints as ``-`` or ``n/a``, never as a number.
"""

from __future__ import annotations


def _num(value: float | None, spec: str = ".3f", missing: str = "-") -> str:
    """A number for the console, or ``missing`` where the report has none (None: not measured or undefined)."""
    return missing if value is None else format(value, spec)


def _cell(value: float | None, width: int = 8, missing: str = "n/a") -> str:
    """A table cell: the value to 4 decimals, or ``missing`` where it was not measured (None)."""
    return f"{_num(value, '.4f', missing):>{width}}"


def _row(values: list[float | None]) -> str:
    """Values to 3 decimals in one line, ``-`` where one was not measured."""
    return " ".join(_num(v, ".3f", "  -  ") for v in values)


def format_table(report: dict, metric: str = "precision@1", site: str = "post") -> str:
    """A compact per-layer table of one metric for every lens, plus R² of mat and id to the last
    layer; ``site="mid"`` tabulates the report's ``mid`` readings (rows: blocks 0..L-1)."""
    last = report["n_layers"]
    if site == "mid":
        part, r2_of = report["mid"], lambda kind, layer: report["mid"]["r2"][kind][layer]
        label, header = "block", [f"{n}@mid" for n in report["mid"]["lenses"]]
    else:
        part, r2_of = report, lambda kind, layer: report["r2"][kind][layer][last]
        label, header = "layer", list(report["lenses"])
    names = list(part["lenses"])
    width = 20 if any("ci_low" in part["lenses"][n] for n in names) else 11
    rows = [f"{label:>5} " + " ".join(f"{n:>{width}}" for n in header) + f" {'R2 mat->L':>10} {'R2 id->L':>10}"
            + f"   ({metric}" + (", 95% interval)" if width > 11 else ")")]
    for layer in part["layers"]:
        vals = " ".join(f"{_with_interval(part['lenses'][n], metric, layer):>{width}}" for n in names)
        rows.append(f"{layer:>5} {vals} {_cell(r2_of('mat', layer), 10, '-')} {_cell(r2_of('id', layer), 10, '-')}")
    return "\n".join(rows)


def _with_interval(scores: dict, metric: str, layer: int) -> str:
    """``0.3910 (0.37–0.41)``: a value with its interval where the scores carry one, ``-`` where not measured."""
    value = scores[metric][layer]
    low, high = (scores.get(k, {}).get(metric, [None] * (layer + 1))[layer] for k in ("ci_low", "ci_high"))
    if value is None or low is None or high is None:
        return _num(value, ".4f")
    return f"{value:.4f} ({low:.2f}–{high:.2f})"


def _point(row: dict) -> dict:
    """A curve point as one-layer scores for :func:`_with_interval`."""
    return {k: ({m: [v] for m, v in row[k].items()} if k in ("ci_low", "ci_high") else [v]) for k, v in row.items()}


def format_paired(report: dict) -> str:
    """Per pair of lenses and metric: the layers where one is significantly ahead (Holm-adjusted over
    the layers), the rest within noise."""
    confidence = report.get("bootstrap", {}).get("confidence", 0.95)
    lines = [f"paired differences on the same {report.get('bootstrap', {}).get('n_documents', '?')} held-out documents "
             f"(bootstrap, Holm over layers, α = {1 - confidence:.2f}):"]
    for pair, by_metric in report.get("paired", {}).items():
        a, b = pair.split(" vs ")
        for metric, d in by_metric.items():
            ahead = {lens: [layer for layer, w in enumerate(d["ahead"]) if w == lens] for lens in (a, b)}
            said = [f"{lens} ahead at layers {layers}" for lens, layers in ahead.items() if layers]
            tested = sum(p is not None for p in d["p_value"])
            noise = tested - sum(len(v) for v in ahead.values())
            lines.append(f"  {pair}, {metric}: " + ("; ".join(said) + "; " if said else "")
                         + f"within noise at {noise} of {tested} layers")
    return "\n".join(lines)


def format_compare(report: dict) -> str:
    """What was fitted and evaluated, then :func:`format_table` (Precision@1), its mid-site table
    when the report read ``hook_resid_mid`` too, and the paired comparisons (:func:`format_paired`)."""
    what = "masked tokens" if report["protocol"] == "masked" else "tokens"
    lines = [f"model {report['model']}: {report['n_layers']} blocks, fit on {report['n_fit_tokens']} {what}, "
             f"evaluated on {report['n_eval_tokens']} held-out {what}", format_table(report)]
    if "mid" in report:
        lines.append(format_table(report, site="mid"))
    if report.get("paired"):
        lines.append(format_paired(report))
    return "\n".join(lines)


def format_submodules(report: dict) -> str:
    """Precision@1 per layer for every swapped sub-module kind, their ranking, and the kinds whose
    swapped model diverged at some layers."""
    names = list(report["variants"])
    lines = [f"{'l':>3} " + " ".join(f"{n:>8}" for n in names) + "   (Precision@1, blocks >= l swapped)"]
    for layer in report["layers"]:
        lines.append(f"{layer:>3} " + " ".join(_cell(report['variants'][n]['precision@1'][layer]) for n in names))
    lines.append("ranking by mean Precision@1 over scored layers: "
                 + ", ".join(f"{r['kind']} {_cell(r['mean_precision@1']).strip()}" for r in report["ranking"]))
    for r in report["ranking"]:
        lost = report["n_layers"] + 1 - r["scored_layers"]
        if lost:
            lines.append(f"{r['kind']}: the swapped model's logits were NaN/Inf at every position at {lost} of "
                         f"{report['n_layers'] + 1} layers (diverged, not measured; see non_finite in report.json)")
    return "\n".join(lines)


def format_linearity(report: dict) -> str:
    """Linearity scores per block (train and held out, with and without the residual), then the
    held-out CE / Precision@1 of pruning the most linear blocks."""
    lines = [f"{'':>5} {'train (the paper)':>25} {'held out':>25}",
             f"{'block':>5} {'LS':>8} {'LS(no residual)':>16} {'LS':>8} {'LS(no residual)':>16} {'|Δh|/|h|':>9} {'cos':>7}"]
    columns = ("linearity", "linearity_no_residual", "heldout_linearity", "heldout_linearity_no_residual")
    for b, (a, c, d, e) in enumerate(zip(*(report[k] for k in columns))):
        lines.append(f"{b:>5} {a:>8.4f} {c:>16.4f} {d:>8.4f} {e:>16.4f} {report['norm_ratio'][b]:>9.4f} "
                     f"{report['cosine'][b]:>7.4f}")
    lines.append(" mean {:>8.4f} {:>16.4f} {:>8.4f} {:>16.4f}".format(*(report[f"mean_{k}"] for k in columns)))
    lines.append(f"pruning (most linear first: blocks {report['order']}); held-out CE / Precision@1:")
    for variant, rows in report["pruning"].items():
        lines.append(f"  {variant:<9}" + "  ".join(f"k={r['k']}: {_num(r['ce'])}/{_num(r['precision@1'])}" for r in rows))
    if "ci_low" in report:
        lines.append("held-out LS, 95% interval per block: " + ", ".join(
            f"{_num(lo)}–{_num(hi)}" for lo, hi in zip(report["ci_low"]["heldout_linearity"],
                                                        report["ci_high"]["heldout_linearity"])))
    for key, label in (("anisotropy", "anisotropy per layer h_0..h_L:         "),
                       ("intrinsic_dimension", "intrinsic dimension per layer h_0..h_L:")):
        if key in report:
            lines.append(f"{label} {_row(report[key])}")
    return "\n".join(lines)


def format_linearity_over_models(summary: dict) -> str:
    """One row per model of :func:`~lensmat.reports.linearity_over_models`: tokens seen, mean
    linearity (train, held out, with and without the residual) and CE."""
    lines = [f"{'model':<48} {'tokens seen':>12} {'LS train':>9} {'LS held out':>11} {'no res. train':>13} "
             f"{'no res. held out':>16} {'CE':>6}"]
    for r in summary["models"]:
        seen = "-" if r["tokens_seen"] is None else f"{r['tokens_seen']:,}"
        lines.append(f"{r['model'][-48:]:<48} {seen:>12} {r['mean_linearity']:>9.4f} {r['mean_heldout_linearity']:>11.4f} "
                     f"{r['mean_linearity_no_residual']:>13.4f} {r['mean_heldout_linearity_no_residual']:>16.4f} "
                     f"{_num(r['ce']):>6}")
    return "\n".join(lines)


def format_saturation(report: dict) -> str:
    """The saturation layers of the top-k ranks, the order tests, the probes and the implant sweep."""
    r = report
    what = {"masked": "masked tokens", "image": "images (CLS token)"}.get(r["protocol"], "tokens")
    lines = [f"{r['lens']} lens, {r['n_kept']} of {r['n_tokens']} held-out {what} with s_1 <= {r['max_s1']} "
             f"(block output {r['max_s1'] - 1} = floor({r['frac']}·L))",
             "k          " + " ".join(f"{k:>6}" for k in range(1, r["k"] + 1)),
             "mean s_k   " + " ".join(f"{v:>6.2f}" for v in r["mean_layer"]),
             "mean rank  " + " ".join("     -" if v is None else f"{v:>6.2f}" for v in r["mean_rank"])]
    if r.get("modality") == "vision":
        lines.insert(1, f"{r['dataset']['name']} held-out images: {r['n_images']}, the model's accuracy on them "
                        f"{r['heldout_accuracy']:.4f}" + (f"; mat maps fitted on {r['n_fit_images']} train images"
                                                           if r.get("n_fit_images") else ""))
    if r.get("architecture") == "encoder-decoder":  # Whisper / T5 decoders (lensmat.analyses.saturation_seq2seq)
        lines.insert(1, f"{r['modality']} encoder-decoder, decoder positions under teacher forcing: {r['n_tokens']} in "
                        f"{r['n_documents']} held-out examples ({r['dataset']['task']})"
                        + (f"; mat maps fitted on {r['n_fit_tokens']} train positions" if r.get("n_fit_tokens") else ""))
    for key, label in (("mean_layer", "mean s_k  "), ("mean_rank", "mean rank ")):
        if "ci_low" in r:
            lines.append(f"{label} 95% interval: " + ", ".join(
                "-" if lo is None else f"{lo:.2f}–{hi:.2f}" for lo, hi in zip(r["ci_low"][key], r["ci_high"][key])))
    for rule, t in r["order_tests"].items():
        chosen = " (reported)" if rule == r["order_rule"] else ""
        low, high = t.get("ci_low", {}).get("kendall_tau"), t.get("ci_high", {}).get("kendall_tau")
        interval = f", 95% interval {low:.3f}–{high:.3f}" if low is not None and high is not None else ""
        lines.append(f"strict Kendall tau, {rule} rule{chosen}: {_num(t['kendall_tau'])}{interval} (p = {t['p_value']}, "
                     f"{t['n_tokens']} {'images' if r['protocol'] == 'image' else 'tokens'} with m >= 3)")
    lines.append(f"probe balanced accuracy per layer: {_row(r['probe_accuracy'])}")
    lines.append(f"noise control:                     {_row(r['probe_control'])}")
    for key, what in (("pooled_probe", "pooled probe"), ("pooled_probe_control", "pooled probe, class-matched noise")):
        pp = r[key]
        if pp["balanced_accuracy"] is not None:
            lines.append(f"{what} (layers {pp['layers'][0]}-{pp['layers'][-1]}, {pp['n_samples']} states): balanced "
                         f"accuracy {pp['balanced_accuracy']:.3f} ± {_num(pp['ste'])}, ROC-AUC per task {_row(pp['roc_auc'])}")
    if r["intervention_sweep"] is None:  # not run (images)
        lines.append(f"implant intervention: not run ({r.get('intervention_note', 'null in the report')})")
    else:
        lines.append("implant success by offset of the implanted layer from s_1(early): " + ", ".join(
            f"{row['offset']:+d}: {'-' if row['success'] is None else format(row['success'], '.2f')} (n={row['n_trials']})"
            for row in r["intervention_sweep"]))
    return "\n".join(lines)


def format_early_exit(report: dict) -> str:
    """Confidence exit per lens (blocks saved, the lambda curve), fixed exit per layer and
    saturation-based exit per method."""
    r = report
    what = "masked tokens (simulated exit at [MASK])" if r["protocol"] == "masked" else "tokens"
    lines = [f"confidence exit on {r['n_eval_tokens']} held-out {what} ({r['n_layers']} blocks); "
             "lambda: mean blocks / Precision@1 / accuracy"]
    for lens, rows in r["curves"].items():
        lines.append(f"  {lens:<10} saves {r['savings'][lens]:.1%} of the blocks at Precision@1 >= {r['retention']}")
        lines.append("    " + "  ".join(f"{row['lambda']:g}: {_num(row['mean_layers'], '.2f')}/{_num(row['precision@1'])}"
                                        for row in rows))
    lines.append("fixed exit, layer: Precision@1")
    for lens, rows in r["fixed_exit"].items():
        lines.append(f"  {lens:<10} " + "  ".join(f"{row['layer']}: {_with_interval(_point(row), 'precision@1', 0)}"
                                                  for row in rows))
    lines.append(f"saturation exit ({r['saturation_lens']} lens): threshold -> Precision@1 / accuracy @ speed-up")
    for method, rows in r["saturation"].items():
        lines.append(f"  {method:<7} " + "  ".join(f"{row['threshold']}: {_num(row['precision@1'])}/{_num(row['accuracy'])}"
                                                   f"@{_num(row['speedup'], '.2f')}x" for row in rows))
    return "\n".join(lines)


def format_transfer(report: dict) -> str:
    """Per lens and read layer ``j``: Precision@1 and KL of the lens of layer ``j`` itself (the diagonal)
    and the change when layer ``j`` is read with the lens of ``j-1`` or ``j+1`` (``-`` where none)."""
    def num(v, spec):
        return f"{'-' if v is None else format(v, spec):>8}"

    lines = [f"model {report['model']}: {report['n_layers']} blocks, evaluated on {report['n_eval_tokens']} held-out "
             "tokens (full matrices [lens layer i][read layer j] in report.json)"]
    for name, matrices in report["transfer"].items():
        near = report["adjacent"][name]
        lines += [f"{name}: at layer j its own lens (i=j), and the change reading j with the lens of i=j-1 or i=j+1",
                  f"{'j':>4} {'P@1 i=j':>8} {'Δ j-1':>8} {'Δ j+1':>8} {'KL i=j':>8} {'Δ j-1':>8} {'Δ j+1':>8}"]
        for j in report["layers"]:
            own = [None if matrices[m][j] is None else matrices[m][j][j] for m in ("precision@1", "kl")]
            lines.append(f"{j:>4} {num(own[0], '.3f')} {num(near['precision@1']['from_previous'][j], '+.3f')} "
                         f"{num(near['precision@1']['from_next'][j], '+.3f')} {num(own[1], '.3f')} "
                         f"{num(near['kl']['from_previous'][j], '+.3f')} {num(near['kl']['from_next'][j], '+.3f')}")
    return "\n".join(lines)


def format_trajectory(report: dict) -> str:
    """The model's prediction at the text's last position and, per lens, the layer from which its
    top-1 there is the model's, with what fitting the lens cost."""
    last = len(report["tokens"]) - 1
    what = "token there" if report["protocol"] == "masked" else "next token"
    lines = [f"{report['model']}: {len(report['tokens'])} tokens, {report['n_layers']} blocks; the model's {what} at "
             f"the last position is {report['final_top1'][last]!r}"]
    for name in report["lenses"]:
        layer = report["summary"][name]["settles_at_layer"][last]
        cost = report["fit_cost"][name]
        lines.append(f"  {name:<10} top-1 = the model's from layer {'-' if layer is None else layer} on; "
                     f"fit {cost['seconds']:.1f} s on {cost['tokens']} tokens")
    return "\n".join(lines)


def format_attribution(report: dict) -> str:
    """Which attention and MLP moved the token: each lens's contribution per block (nats), the causal
    effects measured, and the largest contributions with the change of the final log-prob they cause."""
    position, token, lenses = report["position"], report["token"], report["lenses"]
    lines = [f"{report['model']}: {len(report['tokens'])} tokens; at position {position} "
             f"({report['tokens'][position]!r}) the token {token['text']!r} (id {token['id']}) has final log-prob "
             f"{report['clean_logprob']:.3f}"]
    for name in lenses:
        first, last = report["logprob"][name]["pre"][0], report["logprob"][name]["post"][-1]
        lines.append(f"  {name:<10} logp(h_0) {_num(first)}  logp(h_L) {_num(last)}  Σ attn + mlp = "
                     f"{_num(report['total'][name])}")
    measured = [(k, e) for k, effects in report["effects"].items() for e, values in effects.items()
                if any(v is not None for v in values)] if report.get("all_effects") else []
    head = [f"attn:{n}" for n in lenses] + [f"mlp:{n}" for n in lenses] + [f"{k}:{e}" for k, e in measured]
    lines.append(f"{'block':>5} " + " ".join(f"{h:>11}" for h in head)
                 + ("   (nats; effects: intervened − clean final log-prob)" if measured else "   (nats)"))
    for block in range(report["n_layers"]):
        cells = ([report["attn"][n][block] for n in lenses] + [report["mlp"][n][block] for n in lenses]
                 + [report["effects"][k][e][block] for k, e in measured])
        lines.append(f"{block:>5} " + " ".join(_cell(v, 11, "-") for v in cells))
    if report["largest"]:
        where = ("at the attributed position only" if report.get("ablate_at") == "position"
                 else "at every position of the text")
        lines.append("largest |attribution| per lens, and the change of the final log-prob (intervened − clean) when "
                     f"the sub-module is swapped for its map / zeroed / set to its mean, {where}:")
        lines.append(f"  {'lens':<10} {'kind':<4} {'block':>5} {'attribution':>11} {'swap':>8} {'zero':>8} {'mean':>8}")
        for r in report["largest"]:
            lines.append(f"  {r['lens']:<10} {r['kind']:<4} {r['block']:>5} {_cell(r['attribution'], 11, '-')} "
                         f"{_cell(r['swap_effect'], 8, '-')} {_cell(r['zero_effect'], 8, '-')} "
                         f"{_cell(r['mean_effect'], 8, '-')}")
    return "\n".join(lines)


def format_intervene(report: dict) -> str:
    """What the intervention changed: whether anything did (and from which layer), the model's output at
    the last position clean and intervened, and per lens the mean change over positions of each measure
    at up to 13 layers (``L`` always shown); with ``generation``, both continuations."""
    last, n_layers = len(report["tokens"]) - 1, report["n_layers"]
    lines = [f"{report['model']}: {report['intervention'].get('label', '')}; {len(report['tokens'])} tokens, "
             f"{n_layers} blocks"]
    if report["changed"] and report["changed_from_layer"] is None:
        lines.append("  changed the output logits only (a hook after h_L): no lens reading moves")
    elif report["changed"]:
        lines.append(f"  changed from residual layer {report['changed_from_layer']} on (max |Δh| "
                     f"{_num(report['max_abs_change'], '.4g')}, relative {_num(report['relative_change'], '.3g')})")
    else:
        lines.append(f"  NOTHING CHANGED: every h_l and the logits equal the clean forward's (max |Δh| "
                     f"{_num(report['max_abs_change'], '.3g')}); see the NoEffectWarning")
    if report.get("hooks_not_run"):
        lines.append(f"  hooks that never ran: {', '.join(report['hooks_not_run'])}")
    output = report["output"]
    lines.append(f"  the model's top-1 at the last position: {report['clean_final_top1'][last]!r} clean, "
                 f"{report['intervened_final_top1'][last]!r} intervened; output KL(clean || intervened) "
                 f"{_num(output['mean_kl'], '.4f')} nats on average, top-1 kept at {_num(output['precision@1'], '.0%')} "
                 "of positions")
    step = max(1, -(-n_layers // 12))
    layers = sorted(set(range(0, n_layers + 1, step)) | {n_layers})
    rank = f"rank {report['rank_of']!r}" if report.get("rank_of") is not None else "rank next"
    names = {"precision@1": ("ΔP@1", ".3f"), "kl": ("ΔKL", ".3f"), "rank": (f"Δ{rank}", ".1f")}
    width = max(len(n) for n, _ in names.values()) + max(len(lens) for lens in report["lenses"]) + 3
    lines.append("  mean over positions, intervened − clean, per layer:")
    lines.append("  " + " " * width + "".join(f"{layer:>10}" for layer in layers))
    for lens, metrics in report["per_layer"].items():
        for metric, (label, spec) in names.items():
            delta = metrics[metric]["delta"]
            lines.append(f"  {lens + ' ' + label:<{width}}" + "".join(f"{_num(delta[layer], spec):>10}" for layer in layers))
    generation = report.get("generation")
    if generation:
        first = generation["first_difference"]
        lines.append(f"  generated {generation['max_new_tokens']} tokens: clean {generation['clean']['text']!r}")
        lines.append(f"  {'':>{len(str(generation['max_new_tokens'])) + 17}}intervened {generation['intervened']['text']!r}"
                     f" ({'identical' if first is None else f'first difference at token {first}'})")
    return "\n".join(lines)
