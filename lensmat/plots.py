"""Matplotlib figures of reports. Each function returns the figure and, given ``out``, saves PNGs;
:func:`html_table` is the notebook view (``_repr_html_``) every result object shares."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def _save(fig, out: str | os.PathLike | None, name: str):
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(out) / name, dpi=120, bbox_inches="tight")
    return fig


def _close(figs: list, out) -> list:
    """Close saved figures (kept open for inline display when ``out`` is None)."""
    if out is not None:
        for f in figs:
            plt.close(f)
    return figs


def per_layer(curves: dict[str, list[float | None]], ylabel: str, title: str, ax=None,
              bands: dict[str, tuple[list, list]] | None = None):
    """One line per name over residual layers 0..L, with its interval shaded where ``bands[name]``
    gives ``(low, high)`` per layer."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in curves.items():
        xs = [i for i, v in enumerate(values) if v is not None]
        (line,) = ax.plot(xs, [values[i] for i in xs], marker="o", ms=3, label=name)
        band(ax, range(len(values)), *(bands or {}).get(name, ((), ())), line.get_color())
    ax.set_xlabel("residual layer l")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def band(ax, xs, low, high, colour) -> None:
    """Shade an interval ``low..high`` (``None`` entries skipped) at ``xs``."""
    keep = [(x, lo, hi) for x, lo, hi in zip(xs, low, high) if lo is not None and hi is not None]
    if keep:
        x, lo, hi = zip(*keep)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)


def point_band(ax, rows: list[dict], x: str, colour) -> None:
    """Shade the Precision@1 interval of curve points (``rows`` sorted by ``x``) that carry ``ci_low``/``ci_high``."""
    if rows and "ci_low" in rows[0]:
        band(ax, [r[x] for r in rows], [r["ci_low"]["precision@1"] for r in rows],
             [r["ci_high"]["precision@1"] for r in rows], colour)


def metric_curves(scores: dict[str, dict], metric: str) -> tuple[dict, dict]:
    """``({name: values}, {name: (ci_low, ci_high)})`` of ``metric`` from ``{name: scores}`` (the bands
    where the scores carry intervals)."""
    curves = {n: s[metric] for n, s in scores.items()}
    bands = {n: (s["ci_low"][metric], s["ci_high"][metric]) for n, s in scores.items() if "ci_low" in s}
    return curves, bands


def model_label(name: str, width: int = 40) -> str:
    """A model name short enough for a title: a path's last folder, cut to ``width`` characters."""
    name = str(name)
    if "/" in name and Path(name).expanduser().exists():
        name = Path(name).name or name
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _subject(report: dict) -> str:
    """The model, and for the masked protocol the positions scored: the titles' parenthesis."""
    where = {"masked": ", [MASK] positions", "image": ", CLS token of each image"}.get(report.get("protocol"), "")
    return model_label(report.get("model", "")) + where


def mid_curves(report: dict, metric: str, ax) -> None:
    """A ``compare --sites post,mid`` report's ``resid_mid`` readings, dashed, at ``x = l + 0.5``
    (after block ``l``'s attention, before its MLP)."""
    if "mid" not in report:
        return
    for name, scores in report["mid"]["lenses"].items():
        xs = [layer for layer in report["mid"]["layers"] if scores[metric][layer] is not None]
        (line,) = ax.plot([x + 0.5 for x in xs], [scores[metric][x] for x in xs], ls="--", marker="x", ms=3,
                          label=f"{name} @ mid")
        if "ci_low" in scores:
            band(ax, [x + 0.5 for x in report["mid"]["layers"]], scores["ci_low"][metric], scores["ci_high"][metric],
                 line.get_color())
    ax.legend(fontsize=8)


def precision_figure(report: dict, out=None):
    """Precision@1/5/10 per layer, one line per lens; the model is named once, above the panels."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
    for ax, k in zip(axes, (1, 5, 10)):
        curves, bands = metric_curves(report["lenses"], f"precision@{k}")
        per_layer(curves, f"Precision@{k}", f"Precision@{k} vs the model's top-1", ax, bands)
        mid_curves(report, f"precision@{k}", ax)
    fig.suptitle(_subject(report))
    fig.tight_layout()
    return _save(fig, out, "precision.png")


def metric_figure(report: dict, metric: str, ylabel: str, out=None):
    """One metric per layer, one line per lens (e.g. ``kl``, ``surprisal``, ``ce``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves, bands = metric_curves(report["lenses"], metric)
    per_layer(curves, ylabel, f"{metric} per layer ({_subject(report)})", ax, bands)
    mid_curves(report, metric, ax)
    fig.tight_layout()
    return _save(fig, out, f"{metric}.png")


def r2_figure(report: dict, out=None):
    """R² heatmaps of mat and id for every pair l < l', side by side; when only the maps to the
    last layer were scored, R² of ``h_l -> h_L`` per layer instead."""
    last = len(report["r2"]["mat"]) - 1
    if all(v is None for row in report["r2"]["id"] for v in row[:last]):
        fig, ax = plt.subplots(figsize=(6, 4))
        per_layer({kind: [row[last] for row in report["r2"][kind]] for kind in ("mat", "id")}, "R² (held-out)",
                  f"R² of h_l -> h_L ({_subject(report)})", ax)
        ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.02)
        fig.tight_layout()
        return _save(fig, out, "r2.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, ("mat", "id")):
        grid = np.array([[np.nan if v is None else v for v in row] for row in report["r2"][kind]], dtype=float)
        im = ax.imshow(np.clip(grid, -1.0, 1.0), vmin=-1.0, vmax=1.0, cmap="viridis", origin="upper")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v) and grid.shape[0] <= 13:
                ax.text(j, i, f"{v:.2f}" if v > -10 else f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
        ax.set_title(f"R² of {kind}: h_l -> h_l' (colour clipped at -1)")
        ax.set_xlabel("target layer l'")
        ax.set_ylabel("source layer l")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, out, "r2.png")


METRIC_LABELS = {"kl": "KL(p || q) [nats]", "surprisal": "surprisal [nats]", "ce": "CE [nats]"}


def lens_plots(report: dict, out=None, metrics=("kl",)) -> list:
    """Precision@1/5/10 and one figure per metric of ``metrics`` (:data:`METRIC_LABELS`), one line per
    lens of ``report["lenses"]`` (``{lens: {metric: [per layer]}}``; ``model`` names it when given)."""
    figs = [precision_figure(report, out)] + [metric_figure(report, m, METRIC_LABELS[m], out) for m in metrics]
    return _close(figs, out)


def compare_plots(report: dict, out=None) -> list:
    """All figures of a ``compare`` report."""
    return lens_plots(report, out, ("kl", "surprisal", "ce")) + _close([r2_figure(report, out)], out)


def submodule_plots(report: dict, out=None) -> list:
    """The paper-protocol curves (Precision@1 and surprisal per variant) and the single-block matrix."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric, label, title in zip(axes, ("precision@1", "surprisal"), ("Precision@1", "surprisal [nats]"),
                                        ("blocks ≥ l swapped (paper protocol)", "surprisal of the swapped model's top-1")):
        curves, bands = metric_curves(report["variants"], metric)
        per_layer(curves, label, title, ax, bands)
    fig.tight_layout()
    figs = [_save(fig, out, "protocol.png")]
    kinds = list(report["single_block"])
    if kinds:
        grid = np.array([report["single_block"][k]["precision@1"][: report["n_layers"]] for k in kinds], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * grid.shape[1], 1.2 + 0.5 * len(kinds)))
        im = ax.imshow(grid, vmin=float(np.nanmin(grid)), vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xlabel("block")
        ax.set_title("Precision@1 with one sub-module swapped")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        figs.append(_save(fig, out, "single_block.png"))
    return _close(figs, out)


def linearity_plots(report: dict, out=None) -> list:
    """The per-block linearity profile, the depth-pruning curves (CE and Precision@1 against k) and, when the
    report has them, the anisotropy and intrinsic dimension per residual layer ``0..L`` (``geometry.png``)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    blocks = range(report["n_layers"])
    for key, label, colour in (("linearity", "h_l -> h_{l+1}", "tab:blue"),
                               ("linearity_no_residual", "h_l -> h_{l+1} − h_l", "tab:orange")):
        ax.plot(blocks, report[key], marker="o", ms=3, color=colour, label=f"{label} (train)")
        ax.plot(blocks, report[f"heldout_{key}"], ls="--", color=colour, label=f"{label} (held out)")
        if "ci_low" in report:
            band(ax, blocks, report["ci_low"][f"heldout_{key}"], report["ci_high"][f"heldout_{key}"], colour)
    ax.set_xlabel("block l")
    ax.set_ylabel("linearity score")
    ax.set_title("Linearity per block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.plot(blocks, report["norm_ratio"], marker="o", ms=3, label="‖h_{l+1} − h_l‖ / ‖h_l‖")
    ax2.plot(blocks, report["cosine"], marker="o", ms=3, label="cos(h_l, h_{l+1})")
    ax2.set_xlabel("block l")
    ax2.set_title("A block's output against its input (held out, token-pooled)", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(_subject(report))
    fig.tight_layout()
    figs = [_save(fig, out, "linearity.png")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric, label in zip(axes, ("ce", "precision@1"), ("held-out CE [nats]", "Precision@1 vs the full model")):
        for variant, rows in report["pruning"].items():
            (line,) = ax.plot([r["k"] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=variant)
            if rows and "ci_low" in rows[0]:
                band(ax, [r["k"] for r in rows], [r["ci_low"][metric] for r in rows], [r["ci_high"][metric] for r in rows],
                     line.get_color())
        ax.set_xlabel("k most linear blocks removed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    figs.append(_save(fig, out, "pruning.png"))
    if report.get("anisotropy") is None:  # reports written before lensmat had it
        return _close(figs, out)
    settings = report.get("geometry", {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    per_layer({"λ_max / Σλ": report["anisotropy"]}, "anisotropy",
              f"Anisotropy ({settings.get('n_tokens', '?')} {settings.get('split', '')} tokens)", ax=ax)
    per_layer({"TwoNN": report["intrinsic_dimension"]}, "intrinsic dimension",
              f"Intrinsic dimension (first {settings.get('n_id_tokens', '?')} tokens)", ax=ax2)
    fig.suptitle(_subject(report))
    fig.tight_layout()
    figs.append(_save(fig, out, "geometry.png"))
    return _close(figs, out)


def linearity_models_plot(report: dict, out=None) -> list:
    """Mean linearity (train and held out, with and without the residual) and held-out CE per model,
    against tokens seen when every model records them, else in the order given."""
    rows = report["models"]
    seen = [r["tokens_seen"] for r in rows]
    by_tokens = all(t is not None for t in seen)
    xs = seen if by_tokens else list(range(len(rows)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label, colour, style in (("mean_linearity", "with residual, train", "tab:blue", "-"),
                                      ("mean_heldout_linearity", "with residual, held out", "tab:blue", "--"),
                                      ("mean_linearity_no_residual", "without residual, train", "tab:orange", "-"),
                                      ("mean_heldout_linearity_no_residual", "without residual, held out", "tab:orange", "--")):
        ax.plot(xs, [r[key] for r in rows], marker="o", ms=3, ls=style, color=colour, label=label)
    ax2.plot(xs, [r["ce"] for r in rows], marker="o", ms=3, color="tab:green")
    for a in (ax, ax2):
        a.set_xlabel("training tokens seen" if by_tokens else "model")
        if by_tokens and max(xs) > 0:  # symlog: a checkpoint at 0 tokens (the initialisation) stays on the axis
            a.set_xscale("symlog", linthresh=min([x for x in xs if x > 0] or [1]))
        elif not by_tokens:
            a.set_xticks(xs, [model_label(r["model"], 24) for r in rows], rotation=20, fontsize=7)
        a.grid(alpha=0.3)
    ax.set_ylabel("mean linearity score")
    ax.legend(fontsize=7)
    ax2.set_ylabel("held-out CE [nats]")
    ax.set_title("Linearity across models", fontsize=9)
    ax2.set_title("Quality of the same models", fontsize=9)
    fig.tight_layout()
    return _close([_save(fig, out, "linearity_models.png")], out)


def saturation_plots(report: dict, out=None) -> list:
    """Mean saturation layer per rank k; the task probe's balanced accuracy per layer against its
    Gaussian-noise control, with the pooled probe's as horizontal lines; the implant's success rate
    per offset of the implanted layer from the early token's ``s_1``."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ks = range(1, len(report["mean_layer"]) + 1)
    if "ci_low" in report:  # the bars' 95% intervals over documents
        low, high = report["ci_low"]["mean_layer"], report["ci_high"]["mean_layer"]
        errors = [[m - lo if None not in (m, lo) else 0 for m, lo in zip(report["mean_layer"], low)],
                  [hi - m if None not in (m, hi) else 0 for m, hi in zip(report["mean_layer"], high)]]
    else:
        errors = None
    axes[0].bar(ks, report["mean_layer"], color="tab:blue", yerr=errors, capsize=3)
    for k, layer, rank in zip(ks, report["mean_layer"], report["mean_rank"]):
        axes[0].text(k, layer, "rank n/a" if rank is None else f"rank {rank:.2f}", ha="center", va="bottom", fontsize=8)
    tau = report["kendall_tau"]
    axes[0].set_title(f"{report['lens']} lens: mean s_k (τ = {'n/a' if tau is None else f'{tau:.3f}'}, "
                      f"p = {'n/a' if report['p_value'] is None else format(report['p_value'], '.3g')})", fontsize=9)
    axes[0].set_xlabel("rank k")
    axes[0].set_ylabel("mean saturation layer")
    per_layer({"probe": report["probe_accuracy"], "noise control": report["probe_control"]},
              "balanced accuracy", "task probe (5-fold CV)", axes[1])
    for key, label, colour in (("pooled_probe", "pooled probe", "tab:blue"),
                               ("pooled_probe_control", "pooled, class-matched noise", "tab:orange")):
        acc = (report.get(key) or {}).get("balanced_accuracy")
        if acc is not None:
            used = report[key]["layers"]
            axes[1].axhline(acc, ls=":", color=colour, label=f"{label} (layers {used[0]}–{used[-1]}): {acc:.2f}")
    axes[1].legend(fontsize=7)
    sweep = [r for r in report.get("intervention_sweep") or [] if r["success"] is not None]
    axes[2].bar([r["offset"] for r in sweep], [r["success"] for r in sweep], color="tab:blue", alpha=0.7)
    for r in sweep:
        axes[2].text(r["offset"], r["success"], f"n={r['n_trials']}", ha="center", va="bottom", fontsize=7)
    axes[2].set_xlabel("implanted layer − s_1(early token)")
    axes[2].set_ylabel("success (new s_1 = implanted layer)")
    axes[2].set_title("implant intervention", fontsize=9)
    if report.get("intervention_sweep") is None:  # not run (images)
        axes[2].text(0.5, 0.5, report.get("intervention_note", "not run"), ha="center", va="center", fontsize=8,
                     transform=axes[2].transAxes)
    axes[2].set_ylim(0, 1.05)
    axes[2].grid(alpha=0.3)
    fig.suptitle(_subject(report))
    fig.tight_layout()
    return _close([_save(fig, out, "saturation.png")], out)


def early_exit_plots(report: dict, out=None) -> list:
    """Precision@1 against mean blocks run (confidence exit, one line per lens, with the fixed-exit
    baseline dashed) and Precision@1 against speed-up for each saturation-exit method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for lens, rows in report["curves"].items():
        rows = sorted(rows, key=lambda r: r["mean_layers"])
        line, = axes[0].plot([r["mean_layers"] for r in rows], [r["precision@1"] for r in rows], marker="o", ms=3,
                             label=f"{lens} (saves {report['savings'][lens]:.1%})")
        point_band(axes[0], rows, "mean_layers", line.get_color())
        fixed = report.get("fixed_exit", {}).get(lens)
        if fixed:
            axes[0].plot([r["mean_layers"] for r in fixed], [r["precision@1"] for r in fixed], ls="--", lw=1,
                         color=line.get_color(), label=f"{lens}, fixed exit layer")
            point_band(axes[0], fixed, "mean_layers", line.get_color())
    axes[0].axhline(report["retention"], color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("mean blocks run")
    axes[0].set_ylabel("Precision@1 vs the full model")
    axes[0].set_title(f"confidence exit ({model_label(report['model'])})")
    for method, rows in report["saturation"].items():
        line, = axes[1].plot([r["speedup"] for r in rows], [r["precision@1"] for r in rows], marker="o", ms=3,
                             label=method)
        point_band(axes[1], sorted(rows, key=lambda r: r["speedup"]), "speedup", line.get_color())
    axes[1].set_xlabel("speed-up (L · tokens / blocks run)")
    axes[1].set_ylabel("Precision@1 vs the full model")
    axes[1].set_title(f"saturation exit ({report['saturation_lens']} lens)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _close([_save(fig, out, "early_exit.png")], out)


def trajectory_summary_plots(report: dict, out=None) -> list:
    """A ``trajectory`` report's per-layer means over positions of its ``statistic``, one line per lens
    (the heatmap itself needs the :class:`~lensmat.analyses.trajectory.Trajectory`)."""
    stat = report["statistic"]
    ax = per_layer({n: s[f"mean_{stat}"] for n, s in report["summary"].items()}, f"mean {stat} over positions",
                   f"{stat} per layer ({_subject(report)})")
    ax.figure.tight_layout()
    return _close([_save(ax.figure, out, "trajectory_summary.png")], out)


def attribution_plots(report: dict, out=None) -> list:
    """An ``attribution`` report as bars, one panel per lens: each block's attention and MLP contribution
    to the token's log-probability (nats), with the causal effects measured marked on their bar as
    ``clean − intervened`` (what the sub-module adds to the final log-probability), so that a lens
    that reads a sub-module right puts bar and marks on the same side. Saved as ``attribution.png``."""
    lenses, n = report["lenses"], report["n_layers"]
    fig, axes = plt.subplots(len(lenses), 1, figsize=(max(7.0, 1.0 + 0.42 * n), 1.5 + 2.6 * len(lenses)),
                             squeeze=False, sharex=True)
    xs, width = np.arange(n), 0.38
    marks = {"zero": ("x", "black"), "mean": ("o", "tab:red"), "swap": ("^", "tab:green")}
    for ax, lens in zip(axes[:, 0], lenses):
        for i, (kind, colour) in enumerate((("attn", "tab:blue"), ("mlp", "tab:orange"))):
            at = xs + (i - 0.5) * width
            values = np.array([np.nan if v is None else v for v in report[kind][lens]], dtype=float)
            ax.bar(at, np.nan_to_num(values), width, color=colour, label=f"{kind} (lens)")
            for effect, (marker, mcolour) in marks.items():
                causal = np.array([np.nan if v is None else -v for v in report["effects"][kind][effect]], dtype=float)
                if np.isfinite(causal).any():
                    face = {"facecolors": "none", "edgecolors": mcolour} if marker == "o" else {"color": mcolour}
                    ax.scatter(at, causal, marker=marker, s=26, zorder=3, label=f"clean − {effect}", **face)
        ax.axhline(0, color="grey", lw=0.6)
        total = report["total"][lens]
        ax.set_title(f"{lens} lens: Σ attn + mlp = logp(h_L) − logp(h_0) = "
                     f"{'n/a' if total is None else f'{total:.3f}'} nats", fontsize=9)
        ax.set_ylabel("Δ log-prob [nats]")
        ax.grid(alpha=0.3, axis="y")
    legend = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=5, fontsize=7, frameon=False)
    axes[-1, 0].set_xticks(xs, [str(x) for x in xs], fontsize=7)
    axes[-1, 0].set_xlabel("block")
    token, position = report["token"], report["position"]
    fig.suptitle(f"{_subject(report)}: what moved {token['text']!r} at position {position} "
                 f"(after {report['tokens'][position]!r}); final log-prob {report['clean_logprob']:.3f}", fontsize=9)
    fig.tight_layout(rect=(0, 0.045 if len(lenses) > 1 else 0.08, 1, 1))
    return _close([_save(fig, out, "attribution.png")], out)


def html_table(frame, title: str, max_rows: int = 24, max_cols: int = 14) -> str:
    """The notebook view of a result: ``title`` above ``frame`` (a pandas DataFrame, pivoted by the
    caller) as an HTML ``<table>``, cut to ``max_rows`` × ``max_cols``; missing values shown as ``–``."""
    import html

    return (f"<p><b>{html.escape(title)}</b></p>"
            + frame.to_html(max_rows=max_rows, max_cols=max_cols, na_rep="–", float_format=lambda v: f"{v:.4g}"))


def _token_label(token: str, width: int = 7) -> str:
    """A token as cell or tick text: outer spaces dropped, newlines and tabs visible, cut to ``width``."""
    text = token.strip(" ").replace("\n", "\\n").replace("\t", "\\t") or repr(token)
    return text if len(text) <= width else text[: width - 1] + "…"


def trajectory_figure(tokens: list[str], values: dict, cells: dict, label: str, title: str | None = None,
                      bounded: bool = False, log_scale: bool = False, layers: list[int] | None = None, out=None):
    """Layer × position heatmaps side by side, one per name in ``values`` (each ``[L+1, pos]``; NaN
    drawn grey), sharing one colour scale and colourbar (``label``: the quantity and its unit; 0..1
    with ``bounded``, symmetric-log with ``log_scale``; otherwise linear from 0, capped at Tukey's far-out
    fence ``Q3 + 3·IQR`` when outliers exceed it, which the colourbar says). The first row is at the bottom,
    rows are labelled with ``layers`` (default 0, 1, …) and columns with ``tokens``; ``cells[name][row][pos]``
    is the text written in each cell. Saved as
    ``trajectory.png`` in ``out``."""
    from matplotlib.colors import Normalize, SymLogNorm

    names = list(values)
    n_layer, n_pos = np.asarray(values[names[0]]).shape
    finite = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values.values()])
    finite = finite[np.isfinite(finite)]
    top = 1.0 if bounded else max(float(finite.max()) if finite.size else 1.0, 1e-6)
    q1, q3 = np.percentile(finite, [25, 75]) if finite.size else (0.0, 0.0)
    fence = float(q3 + 3 * (q3 - q1))  # Tukey's far-out fence
    capped = bool(not (bounded or log_scale) and fence > 0 and top > fence)
    if capped:  # a few outliers (e.g. the logit lens at the embedding) would leave every other cell one colour
        top = fence
        label = f"{label}; colour capped at {top:.3g}"
    norm = SymLogNorm(linthresh=1.0, vmin=0.0, vmax=max(top, 1.0), base=10) if log_scale else Normalize(0.0, top)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    fig, axes = plt.subplots(1, len(names), squeeze=False, sharey=True, layout="constrained",
                             figsize=(len(names) * (0.8 + 0.6 * n_pos) + 1.4, 1.6 + 0.34 * n_layer))
    for ax, name in zip(axes[0], names):
        grid = np.asarray(values[name], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap, norm=norm)
        for (layer, pos), v in np.ndenumerate(grid):
            r, g, b, _ = cmap(norm(v)) if np.isfinite(v) else (0.83, 0.83, 0.83, 1.0)
            ax.text(pos, layer, _token_label(cells[name][layer][pos]), ha="center", va="center", fontsize=7,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
        ax.set_xticks(range(n_pos), [_token_label(t, 10) for t in tokens], rotation=60, ha="right",
                      rotation_mode="anchor", fontsize=7.5)
        ax.set_yticks(range(n_layer), range(n_layer) if layers is None else layers)
        ax.tick_params(axis="y", labelsize=7.5)
        ax.set_title(f"{name} lens", fontsize=10)
        ax.set_xlabel("position (input token)", fontsize=8)
    axes[0, 0].set_ylabel("residual layer l (0 = embedding, bottom)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label=label, shrink=0.9, pad=0.01, extend="max" if capped else "neither")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, "trajectory.png")


def transfer_plots(report: dict, out=None) -> list:
    """A ``transfer`` report's matrices as heatmaps, one figure per lens (``transfer_{lens}.png``):
    Precision@1 (0..1) and KL(p_model ‖ q) in nats (symmetric-log colour) of lens layer ``i`` (rows,
    top to bottom) read at residual layer ``j`` (columns); missing entries grey, the diagonal (the
    lens itself) outlined, values written in the cells up to 13 layers."""
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.patches import Rectangle

    figs, n = [], report["n_layers"] + 1
    for name, matrices in report["transfer"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
        for ax, metric in zip(axes, ("precision@1", "kl")):
            grid = np.array([[np.nan] * n if row is None else [np.nan if v is None else v for v in row]
                             for row in matrices[metric]], dtype=float)
            top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
            norm = (Normalize(0.0, 1.0) if metric == "precision@1"
                    else SymLogNorm(linthresh=0.1, vmin=0.0, vmax=max(top, 0.1), base=10))
            cmap = plt.get_cmap("viridis" if metric == "precision@1" else "viridis_r").with_extremes(bad="lightgrey")
            im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="upper")
            for d in range(n):
                ax.add_patch(Rectangle((d - 0.5, d - 0.5), 1, 1, fill=False, edgecolor="red", lw=1 if n <= 13 else 0.4))
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v) and n <= 13:
                    r, g, b, _ = cmap(norm(v))
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
            ax.set_title("Precision@1 vs the model's top-1" if metric == "precision@1" else "KL(p_model || q) [nats]")
            ax.set_xlabel("read layer j (h_j)")
            ax.set_ylabel("lens layer i (its translator)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{name} lens of layer i read at layer j ({_subject(report)})")
        figs.append(_save(fig, out, f"transfer_{name}.png"))
    return _close(figs, out)


_INTERVENE_METRICS = {"precision@1": "ΔP@1 (vs clean top-1)", "kl": "ΔKL(p_clean ‖ q) [nats]", "rank": "Δ rank"}


def intervene_plots(report: dict, out=None) -> list:
    """An ``intervene`` report's change, intervened − clean, per lens: ``intervene_delta.png``, layer ×
    position heatmaps (a row per measure: Precision@1 against the clean model's top-1, KL(p_clean ‖ q)
    in nats, the rank of the followed or next token; a column per lens; a diverging colour scale centred
    on 0, symmetric-log for KL and rank; grey where undefined), and ``intervene_layers.png``, the mean
    change over positions per layer, one line per lens."""
    from matplotlib.colors import Normalize, SymLogNorm

    lenses, tokens, n = report["lenses"], report["tokens"], report["n_layers"] + 1
    what = f"rank of {report['rank_of']!r}" if report.get("rank_of") is not None else "rank of next token"
    labels = {**_INTERVENE_METRICS, "rank": f"Δ {what}"}
    title = f"{model_label(report.get('model', ''))}: intervened − clean, {report['intervention'].get('label', '')}"
    if not report.get("changed", True):
        title += " (nothing changed)"
    fig, axes = plt.subplots(len(labels), len(lenses), squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(max(5.0, len(lenses) * (1.0 + 0.32 * len(tokens)) + 1.6),
                                      len(labels) * (1.0 + 0.17 * n)))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
    for row, (metric, label) in enumerate(labels.items()):
        grids = {name: np.array([[np.nan if v is None else v for v in r] for r in report["cells"][name][metric]["delta"]],
                                dtype=float) for name in lenses}
        finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
        top = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
        norm = (Normalize(-1.0, 1.0) if metric == "precision@1"
                else SymLogNorm(linthresh=0.1 if metric == "kl" else 1.0, vmin=-top, vmax=top, base=10))
        for col, name in enumerate(lenses):
            ax = axes[row, col]
            im = ax.imshow(np.ma.masked_invalid(grids[name]), origin="lower", aspect="auto", cmap=cmap, norm=norm)
            ax.set_title(f"{name} lens: {label}", fontsize=8)
            ax.set_xticks(range(len(tokens)), [_token_label(t, 8) for t in tokens], rotation=60, ha="right",
                          rotation_mode="anchor", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        axes[row, 0].set_ylabel("residual layer l", fontsize=8)
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.9, pad=0.01).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    figs = [_save(fig, out, "intervene_delta.png")]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), layout="constrained")
    for ax, (metric, label) in zip(axes, labels.items()):
        per_layer({name: report["per_layer"][name][metric]["delta"] for name in lenses}, f"mean {label}",
                  label.split(" (")[0], ax=ax)
        ax.axhline(0.0, color="black", lw=0.6)
        if report.get("changed_from_layer") is not None:
            ax.axvline(report["changed_from_layer"], color="grey", ls=":", lw=0.8)
    fig.suptitle(title + " (mean over positions; dotted: first layer that changed)", fontsize=9)
    figs.append(_save(fig, out, "intervene_layers.png"))
    return _close(figs, out)
