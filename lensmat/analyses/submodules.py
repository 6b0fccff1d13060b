"""Sub-module linear shortcuts: fit per-block maps of ln1, attn, ln2, mlp and whole blocks, and
measure what swapping them in does ("Jump to Conclusions", section on sub-modules).

The paper's protocol, for each residual layer ``l = 0..L``: blocks ``0..l-1`` run exactly, every
later block runs with the chosen part swapped for its map, then the final norm and unembedding.
Variants: ``attn``, ``mlp``, ``ln`` (ln1 and ln2 together), ``mat`` (the whole-block map
``h_l -> h_L``, i.e. the mat lens) and ``id`` (the logit lens). At ``l = L`` every variant is the
full model. Single-block swaps replace one kind in one block only.
Metrics are those of :class:`~lensmat.lenses.metrics.LensScores`, against the full model.
"""

from __future__ import annotations

import time

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lensmat import data
from lensmat.deprecation import renamed
from lensmat.stats.collect import collect, resid_hook, resid_hooks, run_capture
from lensmat.stats.gram import pair_pattern
from lensmat.stats.fit import MapSet, fit_pairs
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import LensScores, Reference
from lensmat.models import describe
from lensmat.stats.bootstrap import Bootstrap
from lensmat.stats.pipeline import Tokenized, maps_from_stats, tokenized
from lensmat.analyses.swap import SUBMODULE_KINDS, block_layout, expand_kinds, submodule_pair, swap_hooks

PROTOCOL_KINDS = ("attn", "mlp", "ln")


@renamed(layers="blocks")
def submodule_pairs(model, kinds=SUBMODULE_KINDS, blocks=None) -> list[tuple[str, str]]:
    """Hook pairs of the given kinds (``ln`` = ln1 + ln2) in the given blocks ``0..L-1`` (default: all)."""
    blocks = range(int(model.cfg.n_layers)) if blocks is None else blocks
    return [submodule_pair(model, kind, block) for block in blocks for kind in expand_kinds(kinds, model)]


def groups_for(pairs: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    """One statistics group per input hook, holding that input and all its targets."""
    by_source: dict[str, list[str]] = {}
    for src, tgt in pairs:
        by_source.setdefault(src, []).append(tgt)
    return [(src, *dict.fromkeys(tgts)) for src, tgts in by_source.items()]


@renamed(layers="blocks", max_tokens="max_fit_tokens")
def fit_submodule_maps(model, dataset=None, *, kinds=SUBMODULE_KINDS, blocks=None,
                       intercept: bool = False, ridge: float = 0.0, split: str = "train",
                       max_fit_tokens: int | None = None, batch_size: int = 16,
                       max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
                       progress: bool = True) -> MapSet:
    """Fit sub-module maps on the unmodified model's activations (the core collector and fitter),
    at the positions a swap replaces (:meth:`~lensmat.stats.pipeline.Tokenized.replaced_batches`): the
    ``kinds`` of the blocks ``blocks`` (``0..L-1``, default all), from at most ``max_fit_tokens``
    tokens of ``dataset`` (anything :func:`~lensmat.stats.pipeline.tokenized` takes). ``layers=`` and
    ``max_tokens=`` are the old names."""
    corpus = tokenized(model, dataset, split, max_length, n_mask=n_mask, mask_seed=mask_seed)
    pairs = submodule_pairs(model, kinds, blocks)
    start = time.perf_counter()
    stats = collect(model, corpus.replaced_batches(batch_size, max_fit_tokens), groups_for(pairs),
                    total_tokens=corpus.n_tokens(max_fit_tokens) if corpus.masking is None else None,
                    progress=progress)
    return maps_from_stats(model, stats, corpus, pairs=pairs, intercept=intercept, ridge=ridge,
                           seconds=time.perf_counter() - start)


@torch.no_grad()
def one_token_attention_swap(model, token_ids) -> tuple[Float[torch.Tensor, "n vocab"], Float[torch.Tensor, "n vocab"]]:
    """``(logits, swapped logits)`` of one-token inputs, one per id in ``token_ids``, with every
    block's attention swapped for its affine map fitted on those same inputs. At one position
    attention is affine in its input (softmax over one key is 1), so the two agree (to float
    rounding) exactly when the ``attn`` hook pair (:func:`~lensmat.analyses.swap.submodule_pair`) is the
    attention module: a check of the pairs on any model."""
    ids = list(token_ids)
    batches = [data.pad([[t] for t in ids[i:i + 256]], has_bos=False) for i in range(0, len(ids), 256)]
    pairs = submodule_pairs(model, ["attn"])
    maps = MapSet(fit_pairs(collect(model, batches, groups_for(pairs), progress=False), pairs, intercept=True),
                  describe(model).to_dict(), True)
    hooks = swap_hooks(model, maps, ["attn"])
    plain = torch.cat([run_capture(model, b, (), logits=True)[1] for b in batches])
    swapped = torch.cat([run_capture(model, b, (), logits=True, fwd_hooks=hooks)[1] for b in batches])
    return plain, swapped


def _swapped_logits(model, batch, hooks) -> torch.Tensor:
    return run_capture(model, batch, (), logits=True, fwd_hooks=hooks)[1]


@torch.no_grad()
def evaluate_swaps(model, sub_maps: MapSet, layer_maps: MapSet | None, batches, *,
                   variants=PROTOCOL_KINDS + ("mat", "id"), single_kinds=PROTOCOL_KINDS,
                   total_tokens: int | None = None, bootstrap: Bootstrap | None = None,
                   progress: bool = True) -> tuple[dict, dict, int]:
    """Protocol scores per variant (L+1 values) and single-block scores per kind (L values).

    Returns ``(variants, single_block, n_tokens)`` with ``{name: {metric: [...]}}`` dicts, each metric with
    its ``ci_low``/``ci_high`` (``bootstrap`` over documents; :meth:`~lensmat.lenses.metrics.LensScores.result`).
    """
    n_layers = int(model.cfg.n_layers)
    lenses = {"id": LogitLens(model)}
    if "mat" in variants:
        if layer_maps is None:
            raise ValueError("The 'mat' variant needs residual maps (layer_maps).")
        lenses["mat"] = MatLens(model, layer_maps)
    swap_variants = [v for v in variants if v not in lenses]
    proto = {v: LensScores(n_layers) for v in variants}
    single = {k: LensScores(n_layers - 1) for k in single_kinds}
    hooks = resid_hooks(n_layers)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="swaps", disable=not progress)
    n_tokens = 0
    for batch in batches:
        captured, logits = run_capture(model, batch, hooks, logits=True)
        ref = Reference(logits, batch)
        for layer in range(n_layers + 1):
            for name, lens in lenses.items():
                if name in proto:
                    proto[name].update(layer, lens(captured[resid_hook(layer)], layer), ref)
            for v in swap_variants:
                swapped = logits if layer == n_layers else _swapped_logits(
                    model, batch, swap_hooks(model, sub_maps, [v], range(layer, n_layers)))
                proto[v].update(layer, swapped, ref)
        for kind in single_kinds:
            for block in range(n_layers):
                single[kind].update(block, _swapped_logits(model, batch, swap_hooks(model, sub_maps, [kind], [block])), ref)
        n_tokens += batch.n_scored
        bar.update(batch.n_scored)
    bar.close()
    return ({v: s.result(bootstrap) for v, s in proto.items()}, {k: s.result(bootstrap) for k, s in single.items()},
            n_tokens)


def _mean_scored(values: list[float | None]) -> float | None:
    """Mean over the layers that were scored (a layer whose swapped forwards all diverged is None)."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def submodules(model=None, dataset: str | None = None, *, kinds=PROTOCOL_KINDS, max_fit_tokens: int | None = None,
               max_eval_tokens: int | None = 20_000, batch_size: int = 16, max_length: int = data.DEFAULT_MAX_LENGTH,
               intercept: bool = False, n_mask: int = 1, mask_seed: int = 0, stats_device: str | None = None,
               memory_limit: int | None = None, bootstrap: Bootstrap | None = None,
               progress: bool = True) -> dict:
    """Fit sub-module and block maps on ``train``, run the paper's protocol and single-block swaps
    on ``heldout``, and return the ``submodules`` report.
    A masked LM runs the masked protocol (``n_mask`` positions per line, ``mask_seed``): scores and
    the mat lens's maps at the masked positions, the sub-module maps at every position of the same
    lines (:meth:`~lensmat.stats.pipeline.Tokenized.replaced_batches`;
    ``n_submodule_fit_tokens``).
    ``stats_device`` / ``memory_limit``: the memory plan, and ``bootstrap``: the intervals beside every
    metric, as in :func:`~lensmat.analyses.compare.compare`."""
    from lensmat.stats.plan import check_memory
    from lensmat.analyses.common import protocol_fields, start_run

    kinds = list(kinds)
    bad = [k for k in kinds if k not in PROTOCOL_KINDS]
    if bad:
        raise ValueError(f"Unknown sub-module kind(s) {bad}; valid kinds: {', '.join(PROTOCOL_KINDS)}.")
    model = start_run(model)
    n_layers = int(model.cfg.n_layers)
    train: Tokenized = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed)
    pairs = submodule_pairs(model, kinds)
    resid = tuple(resid_hooks(n_layers))
    groups = groups_for(pairs)
    memory = check_memory(model, "submodules", train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, n_submodule_groups=len(groups))
    start = time.perf_counter()
    to_last, where = pair_pattern(len(resid), "to_last"), dict(progress=progress, stats_device=stats_device or "cpu")
    if train.masking is None:  # one pass: the swaps and the mat lens read the same positions
        stats = collect(model, train.batches(batch_size, max_fit_tokens), [resid, *groups],
                        pairs=[to_last] + [None] * len(groups), total_tokens=train.n_tokens(max_fit_tokens), **where)
        layer_stats, sub_stats = stats[0], stats[1:]
    else:
        layer_stats = collect(model, train.batches(batch_size, max_fit_tokens), [resid], pairs=[to_last],
                              total_tokens=train.n_tokens(max_fit_tokens), **where)[0]
        sub_stats = collect(model, train.replaced_batches(batch_size, max_fit_tokens), groups, **where)
    seconds = time.perf_counter() - start
    layer_maps = maps_from_stats(model, layer_stats, train, intercept=intercept, seconds=seconds)
    sub_maps = maps_from_stats(model, sub_stats, train, pairs=pairs, intercept=intercept, seconds=seconds)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed)
    variants, single, n_eval = evaluate_swaps(
        model, sub_maps, layer_maps, heldout.batches(batch_size, max_eval_tokens), variants=(*kinds, "mat", "id"),
        single_kinds=kinds, total_tokens=heldout.n_tokens(max_eval_tokens), bootstrap=bootstrap, progress=progress)
    means = {k: _mean_scored(variants[k]["precision@1"]) for k in kinds}
    ranking = sorted(kinds, key=lambda k: -(means[k] if means[k] is not None else -1.0))
    report = {
        "model": layer_maps.model["name"], "n_layers": n_layers, "layers": list(range(n_layers + 1)),
        **protocol_fields(heldout), "n_fit_tokens": layer_stats.n, "n_submodule_fit_tokens": sub_stats[0].n,
        "n_eval_tokens": n_eval, "intercept": intercept, "layout": block_layout(model),
        "pairs": {k: list(submodule_pair(model, k, 0)) for k in expand_kinds(kinds, model)},
        "variants": variants, "single_block": single,
        "ranking": [{"kind": k, "mean_precision@1": means[k],
                     "scored_layers": sum(v is not None for v in variants[k]["precision@1"])} for k in ranking],
        "memory_plan": memory, "bootstrap": (bootstrap or Bootstrap()).to_dict(variants["id"]["n_documents"]),
    }
    return report
