"""Matplotlib figures of reports. Each function returns the figure and, given ``out``, saves PNGs."""

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


def per_layer(curves: dict[str, list[float | None]], ylabel: str, title: str, ax=None):
    """One line per name over residual layers 0..L."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in curves.items():
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], marker="o", ms=3, label=name)
    ax.set_xlabel("residual layer l")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def model_label(name: str, width: int = 40) -> str:
    """A model name short enough for a title: a path's last folder, cut to ``width`` characters."""
    name = str(name)
    if "/" in name and Path(name).expanduser().exists():
        name = Path(name).name or name
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _subject(report: dict) -> str:
    """The model, and for the masked protocol the positions scored: the titles' parenthesis."""
    return model_label(report["model"]) + (", [MASK] positions" if report.get("protocol") == "masked" else "")


def precision_figure(report: dict, out=None):
    """Precision@1/5/10 per layer, one line per lens; the model is named once, above the panels."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
    for ax, k in zip(axes, (1, 5, 10)):
        per_layer({n: s[f"precision@{k}"] for n, s in report["lenses"].items()}, f"Precision@{k}",
                  f"Precision@{k} vs the model's top-1", ax)
    fig.suptitle(_subject(report))
    fig.tight_layout()
    return _save(fig, out, "precision.png")


def metric_figure(report: dict, metric: str, ylabel: str, out=None):
    """One metric per layer, one line per lens (e.g. ``kl``, ``surprisal``, ``ce``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    per_layer({n: s[metric] for n, s in report["lenses"].items()}, ylabel, f"{metric} per layer ({_subject(report)})", ax)
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


def compare_plots(report: dict, out=None) -> list:
    """All figures of a ``compare`` report."""
    figs = [precision_figure(report, out), metric_figure(report, "kl", "KL(p || q) [nats]", out),
            metric_figure(report, "surprisal", "surprisal [nats]", out), metric_figure(report, "ce", "CE [nats]", out),
            r2_figure(report, out)]
    return _close(figs, out)


def submodule_plots(report: dict, out=None) -> list:
    """The paper-protocol curves (Precision@1 and surprisal per variant) and the single-block matrix."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    per_layer({v: s["precision@1"] for v, s in report["variants"].items()}, "Precision@1",
              "blocks ≥ l swapped (paper protocol)", axes[0])
    per_layer({v: s["surprisal"] for v, s in report["variants"].items()}, "surprisal [nats]",
              "surprisal of the swapped model's top-1", axes[1])
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
    """The per-block linearity profile and the depth-pruning curves (CE and Precision@1 against k)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    blocks = range(report["n_layers"])
    for key, label, colour in (("linearity", "h_l -> h_{l+1}", "tab:blue"),
                               ("linearity_no_residual", "h_l -> h_{l+1} − h_l", "tab:orange")):
        ax.plot(blocks, report[key], marker="o", ms=3, color=colour, label=f"{label} (train)")
        ax.plot(blocks, report[f"heldout_{key}"], ls="--", color=colour, label=f"{label} (held out)")
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
            ax.plot([r["k"] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=variant)
        ax.set_xlabel("k most linear blocks removed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    figs.append(_save(fig, out, "pruning.png"))
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
    axes[0].bar(ks, report["mean_layer"], color="tab:blue")
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
        fixed = report.get("fixed_exit", {}).get(lens)
        if fixed:
            axes[0].plot([r["mean_layers"] for r in fixed], [r["precision@1"] for r in fixed], ls="--", lw=1,
                         color=line.get_color(), label=f"{lens}, fixed exit layer")
    axes[0].axhline(report["retention"], color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("mean blocks run")
    axes[0].set_ylabel("Precision@1 vs the full model")
    axes[0].set_title(f"confidence exit ({model_label(report['model'])})")
    for method, rows in report["saturation"].items():
        axes[1].plot([r["speedup"] for r in rows], [r["precision@1"] for r in rows], marker="o", ms=3, label=method)
    axes[1].set_xlabel("speed-up (L · tokens / blocks run)")
    axes[1].set_ylabel("Precision@1 vs the full model")
    axes[1].set_title(f"saturation exit ({report['saturation_lens']} lens)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _close([_save(fig, out, "early_exit.png")], out)
