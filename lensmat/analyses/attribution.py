"""Which sub-block moved a prediction: each attention and MLP's change to one token's log-probability,
read through a lens, beside what ablating or swapping that sub-module does to the model's output.

For a token ``t`` at a position ``p`` of one text, every lens reads the residual stream of every
block ``l = 0..L-1`` at three points, ``blocks.{l}.hook_resid_pre`` (``h_l``), ``hook_resid_mid``
(after attention, before the MLP) and ``hook_resid_post`` (``h_{l+1}``), as ``log q(t)``, the lens's
log-probability of ``t`` there (nats). The lens attribution of the block's two sub-modules is

    attn_l = logp(mid_l) − logp(pre_l),        mlp_l = logp(post_l) − logp(mid_l).

Since ``post_l`` and ``pre_{l+1}`` are the same residual vector read at the same layer, the
contributions telescope: ``Σ_l (attn_l + mlp_l) = logp(h_L) − logp(h_0)``, the lens's reading of the
last layer (the model's own log-probability, for the logit and mat lenses) less its reading of
the embedding (``total.{lens}`` in the report). Reading ``resid_mid`` needs a lens there: the logit
lens reads it as it is (TransformerLens's ``logit_lens(incl_mid=True)``) and the mat lens through
maps ``resid_mid_l -> h_L`` fitted beside its residual maps (``compare``'s ``sites=("post", "mid")``).

The lens attribution is a reading, not a cause. The ``top`` largest contributions (by absolute
value, per lens) are checked causally: the change of the model's *final* log-probability of ``t`` at
``p``, intervened minus clean, when that one sub-module (at every position of the text, or with
``ablate_at="position"`` at ``p`` only, where the lens reads it)

- ``swap``: outputs its fitted linear map instead (:func:`~lensmat.analyses.swap.swap_hooks`, the
  maps fitted on the ``train`` split for that sub-module),
- ``zero``: outputs 0 (``blocks.{l}.hook_attn_out`` / ``hook_mlp_out`` set to zero),
- ``mean``: outputs its mean output over the ``train`` positions (the same hooks).

A sub-module that raised ``t`` has a positive attribution and, if the lens reads it right, a negative
ablation effect. ``all_effects=True`` measures every sub-module, not only the largest.

Blocks whose attention and MLP read the same input in parallel (GPT-J, GPT-NeoX/Pythia, Phi-1/2,
Falcon: :func:`~lensmat.analyses.swap.block_layout` ``parallel``/``parallel-one-norm``) have no
``hook_resid_mid`` and are refused, as are masked LMs (this reads next-token predictions).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lensmat import data, plots
from lensmat.analyses.common import start_run
from lensmat.analyses.submodules import groups_for
from lensmat.analyses.swap import block_layout, submodule_pair, swap_hooks
from lensmat.analyses.trajectory_follow import encode_target
from lensmat.lenses.base import Lens, LogitLens, MatLens, encode_text
from lensmat.lenses.registry import build_lenses, split_lenses
from lensmat.models import describe, input_device, is_masked_lm
from lensmat.stats.collect import resid_hook, run_capture, site_hooks
from lensmat.stats.fit import MapSet
from lensmat.stats.gram import GramStats
from lensmat.stats.pipeline import maps_from_stats, tokenized

ATTRIBUTION_LENSES = ("logit", "mat", "mat-affine")  # the lenses that read resid_mid by name
KINDS = ("attn", "mlp")
READ_SITES = ("pre", "mid", "post")
EFFECTS = ("swap", "zero", "mean")
OUTPUT_HOOKS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}  # the sub-module's whole addition to the stream
PARALLEL = ("parallel", "parallel-one-norm")
ABLATE_AT = ("all", "position")  # where an intervention acts: every position of the text, or the attributed one


def output_hook(kind: str, block: int) -> str:
    """The hook an ablation sets: what sub-module ``kind`` of ``block`` adds to the residual stream
    (``resid_mid − resid_pre`` for ``attn``, ``resid_post − resid_mid`` for ``mlp``)."""
    return f"blocks.{block}.{OUTPUT_HOOKS[kind]}"


@dataclass(repr=False)
class Attribution:
    """The attribution of one token's log-probability at one position to every attention and MLP
    (see the module docstring). Lists are per block ``0..L-1``; log-probabilities in nats; ``None``
    where a lens does not cover a reading (``lens.covers``) or an effect was not measured.

    ``logprob[lens][site]`` (``site`` in ``pre``, ``mid``, ``post``), ``attn[lens]``, ``mlp[lens]``,
    ``total[lens]`` (``logp(h_L) − logp(h_0)`` under the lens), ``effects[kind][effect]`` (``kind``
    in ``attn``, ``mlp``; ``effect`` in ``swap``, ``zero``, ``mean``: intervened − clean final
    log-probability), ``largest`` (per lens, the ``top`` largest ``|attribution|`` with their
    effects). ``maps`` (the mat lens's maps, ``resid_mid`` ones included) and ``sub_maps`` (the
    sub-module maps fitted) can be passed back to :func:`attribute` for another text.
    """

    model: str
    text: str | None
    ids: list[int]
    tokens: list[str]
    position: int
    token_id: int
    token: str
    lenses: list[str]
    logprob: dict[str, dict[str, list[float | None]]]
    attn: dict[str, list[float | None]]
    mlp: dict[str, list[float | None]]
    total: dict[str, float | None]
    clean_logprob: float
    effects: dict[str, dict[str, list[float | None]]]
    largest: list[dict]
    top: int
    info: dict = field(default_factory=dict, repr=False)  # model_info, dataset, layout, fit_cost, memory_plan, ...
    maps: MapSet | None = field(default=None, repr=False)
    sub_maps: MapSet | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.attn[self.lenses[0]]) if self.lenses else 0

    def __repr__(self) -> str:
        largest = ", ".join(f"{r['lens']} {r['kind']} {r['block']} {r['attribution']:+.3f}" for r in self.largest)
        return (f"Attribution({self.model!r}: {self.token!r} at position {self.position} "
                f"({self.tokens[self.position]!r}), final log-prob {self.clean_logprob:.3f}, {self.n_layers} blocks, "
                f"lenses {self.lenses}; largest: {largest or 'none'})")

    def to_dict(self) -> dict:
        """The ``attribution`` report (``docs/reports.md``, ``docs/attribution.md``) as a plain dict."""
        return {
            "model": self.model, "model_info": self.info.get("model_info"), "dataset": self.info.get("dataset"),
            "text": self.text, "tokens": self.tokens, "ids": self.ids, "position": self.position,
            "token": {"id": self.token_id, "text": self.token}, "n_layers": self.n_layers,
            "layout": self.info.get("layout"), "lenses": list(self.lenses), "logprob": self.logprob,
            "attn": self.attn, "mlp": self.mlp, "total": self.total, "clean_logprob": self.clean_logprob,
            "effects": self.effects, "largest": self.largest, "top": self.top,
            "all_effects": bool(self.info.get("all_effects", False)), "ablate_at": self.info.get("ablate_at", "all"),
            "protocol": "causal",
            "fit_cost": self.info.get("fit_cost", {}), "memory_plan": self.info.get("memory_plan"),
        }

    def to_dataframe(self):
        """A pandas DataFrame, one row per lens, block and kind: ``lens, block, kind, attribution,
        logprob_before, logprob_after`` (the lens's readings around the sub-module) and the causal
        ``swap_effect, zero_effect, mean_effect`` (NaN where not measured)."""
        import pandas as pd

        rows = []
        for lens in self.lenses:
            lp = self.logprob[lens]
            for block in range(self.n_layers):
                for kind, before, after in (("attn", "pre", "mid"), ("mlp", "mid", "post")):
                    rows.append({"lens": lens, "block": block, "kind": kind,
                                 "attribution": getattr(self, kind)[lens][block],
                                 "logprob_before": lp[before][block], "logprob_after": lp[after][block],
                                 **{f"{e}_effect": self.effects[kind][e][block] for e in EFFECTS}})
        columns = ["lens", "block", "kind", "attribution", "logprob_before", "logprob_after",
                   *(f"{e}_effect" for e in EFFECTS)]
        return pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[3:]})

    def plot(self, out: str | os.PathLike | None = None):
        """A matplotlib Figure: per lens, the attention and MLP contribution of every block as bars,
        with the measured causal effects marked (as ``clean − intervened``, so that a sub-module that
        raised the token is positive in both). ``out``: a folder to save ``attribution.png`` in."""
        return plots.attribution_plots(self.to_dict(), out)[0]

    def _repr_html_(self) -> str:
        import pandas as pd

        title = (f"Attribution of {self.token!r} at position {self.position} ({self.tokens[self.position]!r}) "
                 f"of {plots.model_label(self.model)}: final log-prob {self.clean_logprob:.3f}; the largest "
                 "contributions, with the change of the final log-prob (intervened − clean)")
        largest = pd.DataFrame(self.largest, columns=["lens", "kind", "block", "attribution", "swap_effect",
                                                      "zero_effect", "mean_effect"])
        frame = self.to_dataframe().pivot(index=["lens", "kind"], columns="block", values="attribution")
        return (plots.html_table(largest.set_index(["lens", "kind", "block"]), title)
                + plots.html_table(frame, "Every block's contribution (nats)"))


def _ids(model, text) -> tuple[torch.Tensor, str | None]:
    """``[1, pos]`` ids on the model's input device, and the text (None when ids were given)."""
    if isinstance(text, str):
        return encode_text(model, text), text
    ids = torch.as_tensor(text) if isinstance(text, (list, tuple, torch.Tensor)) else None
    if ids is None or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"text must be a string or token ids [pos] (BOS included, as the model reads them); got "
                         f"{type(text).__name__}{'' if ids is None else f' {ids.dtype} {list(ids.shape)}'}.")
    vocab, n_ctx = int(model.cfg.d_vocab), int(model.cfg.n_ctx)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"Token ids must lie in 0..{vocab - 1}; got {int(ids.min())}..{int(ids.max())}.")
    if ids.numel() > n_ctx:
        raise ValueError(f"The text is {ids.numel()} tokens long, longer than the model's context of {n_ctx}.")
    return ids[None].long().to(input_device(model)), None


def _decode(model, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return str(token_id) if tokenizer is None else tokenizer.decode([int(token_id)])


def _position(position, n_tokens: int, tokens: list[str]) -> int:
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an integer (a token index, negative counting from the end); got "
                        f"{type(position).__name__} {position!r}.")
    if not -n_tokens <= position < n_tokens:
        shown = tokens if len(tokens) <= 12 else [*tokens[:5], "…", *tokens[-5:]]
        raise IndexError(f"position {position} is out of range: the text is {n_tokens} tokens {shown} (BOS "
                         f"included); pass 0..{n_tokens - 1}, or -{n_tokens}..-1 counting from the end.")
    return position % n_tokens


def refuse_layout(model) -> str:
    """The model's block layout, refusing one without a residual stream between attention and MLP
    (``hook_resid_mid``), and masked LMs; returns the layout."""
    if is_masked_lm(model):
        raise ValueError(f"{model.cfg.model_name!r} is a masked LM; attribution follows a causal model's next-token "
                         "prediction. Use a causal model.")
    layout = block_layout(model)
    missing = [h for h in site_hooks(int(model.cfg.n_layers), "mid") if h not in model.hook_dict]
    if layout in PARALLEL or missing:
        raise ValueError(
            f"{model.cfg.model_name!r} has the {layout!r} block layout (lensmat.analyses.swap.block_layout): its attention "
            "and MLP both read the block's input in parallel, so there is no blocks.{l}.hook_resid_mid between them "
            "and their changes to a prediction cannot be read apart. Attribute whole blocks with "
            "lensmat.trajectory (the lens's reading at h_l and h_{l+1}) instead.")
    if getattr(model.cfg, "attn_only", False):
        raise ValueError(f"{model.cfg.model_name!r} is attention-only: it has no MLP to attribute to.")
    return layout


def _mid_lens(model, name: str, lens: Lens) -> Lens:
    """The ``resid_mid`` reading of a post-site lens: the logit lens there, or the mat lens through its
    ``resid_mid_l -> h_L`` maps; refused for other lenses (pass a ``(post, mid)`` pair)."""
    if isinstance(lens, LogitLens):
        return LogitLens(model, site="mid")
    if isinstance(lens, MatLens):
        missing = _missing_mid_maps(model, lens.maps)
        if missing:
            raise ValueError(f"The {name!r} lens's maps hold no {missing[0]} -> {resid_hook(int(model.cfg.n_layers))} "
                             f"map ({len(missing)} resid_mid maps missing): fit them with sites=('post', 'mid') (let "
                             "attribute fit the lens, or pass maps that hold them, e.g. an earlier result's .maps).")
        return MatLens(model, lens.maps, name=name, site="mid")
    raise ValueError(f"The {name!r} lens ({type(lens).__name__}) has no reading of resid_mid; pass lenses={{{name!r}: "
                     "(post_lens, mid_lens)}} with a lens of site 'mid', or use logit, mat, mat-affine.")


def _missing_mid_maps(model, maps: MapSet) -> list[str]:
    last = resid_hook(int(model.cfg.n_layers))
    return [h for h in site_hooks(int(model.cfg.n_layers), "mid") if (h, last) not in maps.maps]


def _lens_spec(lenses) -> tuple[list[str], dict[str, Lens], object, dict[str, Lens]]:
    """``(names, given, spec, mids)``: the lens keys in order, the ``Lens`` objects among them, the
    specification for :func:`~lensmat.lenses.registry.build_lenses` and the ``resid_mid`` lenses given.
    ``lenses``: names and ``Lens`` objects (:func:`~lensmat.lenses.registry.split_lenses`), or a dict whose
    values may be ``(post, mid)`` pairs."""
    mids: dict[str, Lens] = {}
    if isinstance(lenses, Mapping):
        spec = {}
        for name, value in lenses.items():
            if isinstance(value, tuple):
                if len(value) != 2 or not all(isinstance(v, Lens) for v in value) or value[1].site != "mid":
                    raise ValueError(f"lenses[{name!r}] must be a Lens or a (post lens, mid lens) pair, the second "
                                     "of site 'mid'.")
                spec[name], mids[name] = value
            else:
                spec[name] = value
        lenses = spec
    names, given = split_lenses(lenses)
    unknown = [n for n in names if n not in given and n not in ATTRIBUTION_LENSES]
    if unknown:
        raise ValueError(f"Lens(es) {unknown} cannot read resid_mid by name; attribution builds "
                         f"{', '.join(ATTRIBUTION_LENSES)} (their resid_mid maps fitted beside the residual ones), or "
                         "pass (post lens, mid lens) pairs.")
    wrong = [n for n, lens in given.items() if lens.site != "post"]
    if wrong:
        raise ValueError(f"Lens(es) {wrong} read the mid site; pass post-site lenses (or (post, mid) pairs).")
    return names, given, (lenses if isinstance(lenses, Mapping) else [given.get(n, n) for n in names]), mids


def _check_memory(model, train, n_groups: int, fits_maps: bool, batch_size: int, stats_device, memory_limit,
                  progress: bool) -> dict:
    """The memory plan: the mat maps' statistics with the mid site (when fitted), ``n_groups`` sub-module
    (input, output) statistics, and the activation chunks (``submodules``'s plan, renamed)."""
    from lensmat.stats.plan import ModelShape, cheaper_options, parse_bytes, plan, resolve_stats_device

    p = plan("submodules", ModelShape.of(model), batch_size=batch_size, batch_tokens=train.max_batch_tokens(batch_size),
             mid=True, n_submodule_groups=n_groups, stats_device=resolve_stats_device(stats_device),
             model_device=str(input_device(model)))
    items = {k: v for k, v in p.items.items() if fits_maps or not k.startswith("train statistics")}
    p = dataclasses.replace(p, command="attribution", items=items)
    if progress:
        print(p.format(), file=sys.stderr)
    p.check(parse_bytes(memory_limit), cheaper_options(p, False, batch_size))
    return p.to_dict()


@torch.no_grad()
def _logprob(lens: Lens, h: torch.Tensor, layer: int, token: int) -> float:
    logits = lens(h[None], layer)[0].double()
    return float(logits[token] - torch.logsumexp(logits, -1))


def _readings(lens: Lens, mid: Lens, cache, position: int, token: int, n_layers: int) -> dict[str, list]:
    """``{pre, mid, post}``: the lens's log-probability of ``token`` at every block's three points."""
    out: dict[str, list] = {s: [] for s in READ_SITES}
    for block in range(n_layers):
        for site, reader, layer in (("pre", lens, block), ("mid", mid, block), ("post", lens, block + 1)):
            h = cache[f"blocks.{block}.hook_resid_{site}"][0, position]
            out[site].append(_logprob(reader, h, layer, token) if reader.covers(layer) else None)
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def _largest(lenses: list[str], attn: dict, mlp: dict, top: int) -> list[tuple[str, str, int, float]]:
    """Per lens, the ``top`` contributions of largest ``|attribution|``: ``(lens, kind, block, value)``."""
    out = []
    for lens in lenses:
        cells = [(kind, block, v) for kind, values in (("attn", attn[lens]), ("mlp", mlp[lens]))
                 for block, v in enumerate(values) if v is not None]
        cells.sort(key=lambda c: (-abs(c[2]), c[1], c[0]))
        out += [(lens, kind, block, v) for kind, block, v in cells[:top]]
    return out


@torch.no_grad()
def _submodule_pass(model, train, fit_pairs: list[tuple[str, str]], mean_hooks: list[str], *, max_fit_tokens,
                    batch_size: int, intercept: bool, progress: bool) -> tuple[MapSet | None, dict, dict]:
    """One pass over ``train``: the sub-module maps of ``fit_pairs`` (least squares on the unmodified
    model's activations, as :func:`~lensmat.analyses.submodules.fit_submodule_maps`) and the mean of
    every hook of ``mean_hooks`` over the same positions. Returns ``(maps or None, means, cost)``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    groups = groups_for(fit_pairs)
    wanted = list(dict.fromkeys([h for g in groups for h in g] + list(mean_hooks)))
    stats: list[GramStats] | None = None
    sums: dict[str, torch.Tensor] = {}
    n = 0
    bar = tqdm(total=train.n_tokens(max_fit_tokens), unit="tok", unit_scale=True, desc="sub-modules",
               disable=not progress)
    for batch in train.replaced_batches(batch_size, max_fit_tokens):
        captured, _ = run_capture(model, batch, wanted)
        if stats is None:
            stats = [GramStats(g, tuple(int(captured[h].shape[-1]) for h in g)) for g in groups]
        for st in stats:
            st.update(torch.cat([captured[h] for h in st.hooks], -1))
        for h in mean_hooks:
            rows = captured[h].double().sum(0).cpu()
            sums[h] = rows if h not in sums else sums[h] + rows
        n += batch.n_scored
        bar.update(batch.n_scored)
    bar.close()
    if n == 0:
        raise ValueError("The train split gave no tokens to fit the sub-module maps and means on; pass more text.")
    means = {h: (s / n) for h, s in sums.items()}
    seconds = time.perf_counter() - start
    maps = (maps_from_stats(model, stats, train, pairs=fit_pairs, intercept=intercept, seconds=seconds)
            if fit_pairs else None)
    return maps, means, {"seconds": seconds, "tokens": n}


def _merge(given: MapSet | None, fitted: MapSet | None) -> MapSet | None:
    if given is None or fitted is None:
        return given or fitted
    return dataclasses.replace(fitted, maps={**given.maps, **fitted.maps})


@torch.no_grad()
def _final_logprob(model, ids, position: int, token: int, hooks: list) -> float:
    logits = model.run_with_hooks(ids, fwd_hooks=hooks, return_type="logits")[0, position].double()
    return float(logits[token] - torch.logsumexp(logits, -1))


def _only_at(fn, position: int):
    """The hook ``fn`` with its replacement kept at ``position`` only (the other positions as they were)."""
    def hook(act, hook):
        out = act.clone()
        out[:, position] = fn(act, hook=hook)[:, position].to(act.dtype)
        return out
    return hook


def _effects(model, ids, position: int, token: int, clean: float, cells: list[tuple[str, int]], sub_maps: MapSet,
             means: dict, ablate_at: str = "all") -> dict[str, dict[str, list]]:
    """``{kind: {effect: [L]}}``: intervened − clean final log-probability of ``token`` at ``position`` for
    each ``(kind, block)`` of ``cells`` (intervened at every position, or at ``position`` only with
    ``ablate_at="position"``); ``None`` elsewhere."""
    n_layers = int(model.cfg.n_layers)
    out = {kind: {e: [None] * n_layers for e in EFFECTS} for kind in KINDS}
    for kind, block in cells:
        hook = output_hook(kind, block)
        mean = means[hook]
        interventions = {
            "swap": swap_hooks(model, sub_maps, [kind], [block]),
            "zero": [(hook, lambda act, hook: torch.zeros_like(act))],
            "mean": [(hook, lambda act, hook, mean=mean: mean.to(act.device, act.dtype).expand_as(act).clone())],
        }
        if ablate_at == "position":  # the swap's input hook records; its output hook (the last) replaces
            interventions = {e: [*hooks[:-1], (hooks[-1][0], _only_at(hooks[-1][1], position))]
                             for e, hooks in interventions.items()}
        for effect, hooks in interventions.items():
            out[kind][effect][block] = _final_logprob(model, ids, position, token, hooks) - clean
    return out


# Long for its 17 arguments and their docs; the body is one pass: the text, the lenses, the readings, the checks.
@torch.no_grad()
def attribute(model, lenses, text, *, position: int = -1, token=None, top: int = 3, all_effects: bool = False,
              ablate_at: str = "all",
              maps: MapSet | str | os.PathLike | None = None, sub_maps: MapSet | str | os.PathLike | None = None,
              dataset=None, max_fit_tokens: int | None = None, intercept: bool = False, batch_size: int = 16,
              max_length: int | None = None, stats_device: str | None = None, memory_limit: int | None = None,
              progress: bool = True) -> Attribution:
    """Which attention and MLP moved ``token``'s log-probability at ``position`` of ``text``, read
    through each lens, with the largest checked causally (see the module docstring).

    Args:
        model: a bridge, a spec for :func:`~lensmat.models.load.load_model`, or ``None`` (bundled).
        lenses: ``"logit,mat"`` (names among ``logit``, ``mat``, ``mat-affine``; the mat lenses' maps
            ``h_l -> h_L`` and ``resid_mid_l -> h_L`` fitted on ``dataset``'s train split), ``Lens``
            objects (a ``LogitLens``, or a ``MatLens`` whose maps hold the ``resid_mid`` maps), or a
            ``{name: Lens or (post lens, mid lens)}`` dict.
        text: a string (BOS prepended) or token ids ``[pos]`` as the model reads them.
        position: the token index (BOS included; negative counts from the end) whose next-token
            prediction is attributed.
        token: the token followed: ``None`` (the model's own top-1 there), a token string (exactly one
            token, no BOS) or a token id.
        top: contributions per lens checked causally (largest ``|attribution|``; 0: none).
        all_effects: measure the causal effects of every sub-module, not only the largest.
        ablate_at: ``"all"`` (the sub-module is swapped or ablated at every position of the text) or
            ``"position"`` (at ``position`` only, where the lens reads it; the other positions run clean).
        maps: saved mat maps (a folder or :class:`~lensmat.stats.fit.MapSet`) holding the
            ``resid_mid`` maps too (an earlier result's ``.maps``); ``sub_maps``: sub-module maps to
            reuse (pairs they lack are fitted).
        dataset / max_fit_tokens / max_length / batch_size: the train split the maps and the means
            are fitted on, its token budget, line length and batch size; ``intercept``: fit the
            sub-module maps with an intercept.
        stats_device / memory_limit: the memory plan, as in :func:`~lensmat.analyses.compare.compare`.

    Returns an :class:`Attribution`. Refuses a bad position, token, text or lens, and models without
    ``hook_resid_mid`` (parallel attention and MLP), before fitting anything.
    """
    from lensmat.stats import artifacts

    model = start_run(model)
    layout = refuse_layout(model)
    n_layers = int(model.cfg.n_layers)
    if ablate_at not in ABLATE_AT:
        raise ValueError(f"ablate_at={ablate_at!r}: intervene at 'all' positions or at the attributed 'position' only.")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative integer (contributions per lens checked causally); got {top!r}.")
    ids, text_str = _ids(model, text)
    id_list = [int(t) for t in ids[0].tolist()]
    tokens = [_decode(model, t) for t in id_list]
    position = _position(position, len(id_list), tokens)
    names, given, spec, given_mids = _lens_spec(lenses)
    wanted = [f"blocks.{b}.hook_resid_{s}" for b in range(n_layers) for s in READ_SITES]
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in wanted)
    final = logits[0, position].double()
    token_id = int(final.argmax()) if token is None else encode_target(model, token)
    clean = float(final[token_id] - torch.logsumexp(final, -1))

    if isinstance(maps, (str, os.PathLike)):
        maps = artifacts.load_maps(maps, model)
    if isinstance(sub_maps, (str, os.PathLike)):
        sub_maps = artifacts.load_maps(sub_maps, model)
    if sub_maps is not None:
        sub_maps.check_model(model)
    if maps is not None and "mat" in names and "mat" not in given:
        missing = _missing_mid_maps(model, maps)
        if missing:
            raise ValueError(f"maps= holds no {missing[0]} -> {resid_hook(n_layers)} map ({len(missing)} resid_mid maps "
                             "missing: maps saved by `lensmat fit` read the post site only); pass maps that hold them "
                             "(an earlier attribution's .maps, lensmat.save_maps(result.maps, DIR)) or let attribute "
                             "fit them.")
    fits = any(n in ("mat", "mat-affine") and n not in given and not (n == "mat" and maps is not None) for n in names)
    n_cells = 2 * n_layers if all_effects else min(2 * n_layers, top * len(names))
    train, memory = None, None
    if fits or n_cells:  # the train split: to fit the mat maps, the sub-module maps and their mean outputs
        train = tokenized(model, dataset, "train", max_length or data.DEFAULT_MAX_LENGTH)
        memory = _check_memory(model, train, n_cells, fits, batch_size, stats_device, memory_limit, progress)
    built, fit_cost, mat_maps = build_lenses(model, spec, train, maps=maps, max_fit_tokens=max_fit_tokens,
                                             batch_size=batch_size, stats_device=stats_device, sites=("post", "mid"),
                                             progress=progress)

    logprob, attn, mlp, total = {}, {}, {}, {}
    for name in names:
        mid = given_mids.get(name) or _mid_lens(model, name, built[name])
        logprob[name] = lp = _readings(built[name], mid, cache, position, token_id, n_layers)
        attn[name] = [_diff(m, p) for m, p in zip(lp["mid"], lp["pre"])]
        mlp[name] = [_diff(q, m) for q, m in zip(lp["post"], lp["mid"])]
        total[name] = _diff(lp["post"][-1], lp["pre"][0])

    chosen = _largest(names, attn, mlp, top)
    cells = ([(k, b) for b in range(n_layers) for k in KINDS] if all_effects
             else list(dict.fromkeys((kind, block) for _, kind, block, _ in chosen)))
    pairs = [submodule_pair(model, kind, block) for kind, block in cells]
    to_fit = [p for p in dict.fromkeys(pairs) if sub_maps is None or p not in sub_maps.maps]
    sub_cost = {"seconds": 0.0, "tokens": 0, "reused": not to_fit, "pairs": len(to_fit), "means": len(cells)}
    effects = {kind: {e: [None] * n_layers for e in EFFECTS} for kind in KINDS}
    if cells:
        fitted, means, cost = _submodule_pass(model, train, to_fit, [output_hook(k, b) for k, b in cells],
                                              max_fit_tokens=max_fit_tokens, batch_size=batch_size,
                                              intercept=intercept, progress=progress)
        sub_maps, sub_cost = _merge(sub_maps, fitted), {**sub_cost, **cost}
        effects = _effects(model, ids, position, token_id, clean, cells, sub_maps, means, ablate_at)
    largest = [{"lens": lens, "kind": kind, "block": block, "attribution": value,
                **{f"{e}_effect": effects[kind][e][block] for e in EFFECTS}} for lens, kind, block, value in chosen]
    info = {"model_info": describe(model).to_dict(), "dataset": None if train is None else train.dataset,
            "layout": layout,
            "all_effects": all_effects, "ablate_at": ablate_at, "memory_plan": memory,
            "fit_cost": {**{n: fit_cost[n] for n in names}, "submodules": sub_cost}}
    return Attribution(model=describe(model).name, text=text_str, ids=id_list, tokens=tokens, position=position,
                       token_id=token_id, token=_decode(model, token_id), lenses=names, logprob=logprob, attn=attn,
                       mlp=mlp, total=total, clean_logprob=clean, effects=effects, largest=largest, top=top,
                       info=info, maps=mat_maps, sub_maps=sub_maps)
