"""The saturation protocol's intervention (:mod:`lensmat.analyses.saturation`): implant an early-saturating
token's residual state into a late one's stream and re-measure where its top-1 saturates.
"""

from __future__ import annotations

import random

import torch
from jaxtyping import Float, Int

from lensmat.analyses.saturation_rankings import Rankings, saturation_layers
from lensmat.models import input_device
from lensmat.stats.collect import resid_hook, resid_hooks


@torch.no_grad()
def implanted_top1(model, lens, tokens: list[int], pos: int, layer: int | list[int],
                   state: Float[torch.Tensor, "... d"]) -> Int[torch.Tensor, "... layers"]:
    """The lens's top-1 at ``pos`` at every layer ``0..L`` (``L`` = the model) after replacing
    ``h_layer`` at ``pos`` by ``state`` (a hook at ``blocks.{layer}.hook_resid_pre``) in the line
    ``tokens``, as the model read it (:attr:`Rankings.inputs`: a masked LM's whole line with every
    masked position as ``[MASK]``).

    With a list of ``n`` layers and ``state`` ``[n, d]``, the ``n`` implants run as one batch of
    copies of ``tokens`` (row ``i`` gets ``state[i]`` at ``layer[i]``) and the result is ``[n, L+1]``."""
    single = isinstance(layer, int)
    layers, states = ([layer], state[None]) if single else (list(layer), state)
    n_layers = int(model.cfg.n_layers)
    hooks = resid_hooks(n_layers)

    def put(rows: list[int]):
        def hook(act, hook):
            act[rows, pos] = states[rows].to(act.device, act.dtype)
            return act
        return hook

    implants = [(resid_hook(j), put([i for i, x in enumerate(layers) if x == j])) for j in sorted(set(layers))]
    captured = {}
    capture = [(h, lambda act, hook, h=h: captured.__setitem__(h, act[:, pos].clone())) for h in hooks]
    batch = torch.tensor([tokens] * len(layers), device=input_device(model))
    logits = model.run_with_hooks(batch, fwd_hooks=[*implants, *capture])[:, pos]
    top1 = [lens(captured[h], i).argmax(-1) if lens.covers(i) else logits.argmax(-1)
            for i, h in enumerate(hooks[:-1])]
    out = torch.stack([*top1, logits.argmax(-1)], dim=-1).cpu()
    return out[0] if single else out


OFFSETS = tuple(range(-5, 6))  # the authors' sweep for GPT-2: 5 layers either side of s_1(early)


def implant_pairs(top1: Int[torch.Tensor, "n"], s1: Int[torch.Tensor, "n"], *, min_gap: int = 3,
                  max_pairs: int = 100, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` ``(early, late)`` token pairs with the same final top-1 and
    ``s_1(late) − s_1(early) ≥ min_gap``: random late tokens, each with a random early partner."""
    rng = random.Random(seed)
    by_top1: dict[int, list[int]] = {}
    for i, t in enumerate(top1.tolist()):
        by_top1.setdefault(t, []).append(i)
    pairs = []
    for late in rng.sample(range(len(top1)), len(top1)):
        earlies = [e for e in by_top1[int(top1[late])] if int(s1[late] - s1[e]) >= min_gap]
        if earlies:
            pairs.append((rng.choice(earlies), late))
        if len(pairs) == max_pairs:
            break
    return pairs


@torch.no_grad()
def implant(model, lens, rankings: Rankings, s1: Int[torch.Tensor, "n"], *,
            min_gap: int = 3, offsets: tuple[int, ...] = OFFSETS, max_pairs: int = 100, seed: int = 0,
            pairs: list[tuple[int, int]] | None = None) -> dict:
    """Implant an early token's residual state into a late token's stream and re-measure ``s_1``.

    Pairs ``(early, late)`` (:func:`implant_pairs`, unless given) share the final top-1 and
    ``s_1(late) − s_1(early) ≥ min_gap``. For each implant layer ``j = s_1(early) + offset``
    (``0 ≤ j < s_1(late)``), ``h_j`` of the late token is replaced (hook at
    ``blocks.{j}.hook_resid_pre``) by the early token's ``h_j``, in the late token's line as it was
    ranked (:attr:`Rankings.inputs`; under the masked protocol the whole line, all its masked
    positions as ``[MASK]``). Success (the authors' criterion):
    the late token's new ``s_1`` equals ``j`` and its final top-1 is unchanged. Returns
    ``{"success", "n_trials", "n_pairs", "by_offset": [{"offset", "success", "n_trials"}]}``;
    ``success`` and ``n_trials`` are offset 0's (``None`` / 0 when no pair allows it).
    """
    if rankings.resid is None:
        raise ValueError("The intervention needs residual states: collect rankings with keep_resid=True.")
    n_layers = int(model.cfg.n_layers)
    top1 = rankings.final_topk[:, 0]
    if pairs is None:
        pairs = implant_pairs(top1, s1, min_gap=min_gap, max_pairs=max_pairs, seed=seed)
    successes, trials = dict.fromkeys(offsets, 0), dict.fromkeys(offsets, 0)
    for early, late in pairs:
        line, pos = rankings.origin[late]
        tried = [o for o in offsets if 0 <= int(s1[early]) + o < min(int(s1[late]), n_layers)]
        if not tried:
            continue
        layers = [int(s1[early]) + o for o in tried]  # one batch: every offset of this pair
        new_top1 = implanted_top1(model, lens, rankings.inputs[line], pos, layers, rankings.resid[layers, early])
        new_s1 = saturation_layers(new_top1.T[:, :, None], new_top1[:, -1:], start=1)[:, 0]
        for o, j, row, first in zip(tried, layers, new_top1, new_s1.tolist()):
            successes[o] += int(first == j and int(row[-1]) == int(top1[late]))
            trials[o] += 1
    by_offset = [{"offset": o, "success": successes[o] / trials[o] if trials[o] else None, "n_trials": trials[o]}
                 for o in offsets]
    zero = next((r for r in by_offset if r["offset"] == 0), {"success": None, "n_trials": 0})
    return {"success": zero["success"], "n_trials": zero["n_trials"], "n_pairs": len(pairs), "by_offset": by_offset}
