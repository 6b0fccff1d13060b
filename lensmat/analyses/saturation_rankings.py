"""The measurement under the saturation protocol (:mod:`lensmat.analyses.saturation`): a lens's top-K at every
residual layer on a corpus's scored positions (:class:`Rankings`), and the saturation layer ``s_k`` of each token
and rank (:func:`saturation_layers`). Early exit (:mod:`lensmat.analyses.early_exit`) reads the same rankings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from lensmat.lenses import engine
from lensmat.models import model_device
from lensmat.stats.collect import resid_hooks, run_capture
from lensmat.stats.pipeline import Tokenized


@dataclass
class Rankings:
    """Per-token top-K ids under a lens at every residual layer, on a corpus's scored positions.

    ``lens_topk`` is ``[L+1, n, K]`` (layer ``L`` = the model's output) and ``lens_topp`` their
    probabilities under the lens; ``resid`` ``[L+1, n, d_model]`` (float32, CPU) when kept;
    ``origin[i] = (line, position)``, ``line`` indexing the corpus's ``seqs``; ``inputs[line]`` the
    token ids that line was run with (under the masked protocol, every masked position holds
    ``[MASK]``; a causal line may be cut by ``max_tokens``).
    """

    lens_topk: Int[torch.Tensor, "layers n k"]
    lens_topp: Float[torch.Tensor, "layers n k"]
    resid: Float[torch.Tensor, "layers n d"] | None
    origin: list[tuple[int, int]]
    inputs: dict[int, list[int]]

    def select(self, keep: torch.Tensor) -> "Rankings":
        """The tokens where the boolean mask ``keep`` ``[n]`` is true."""
        return Rankings(self.lens_topk[:, keep], self.lens_topp[:, keep],
                        None if self.resid is None else self.resid[:, keep],
                        [o for o, m in zip(self.origin, keep.tolist()) if m], self.inputs)

    @property
    def documents(self) -> Int[torch.Tensor, "n"]:
        """Each token's line: the document the intervals resample (:mod:`lensmat.stats.bootstrap`)."""
        return torch.tensor([line for line, _ in self.origin], dtype=torch.long)

    @property
    def final_topk(self) -> Int[torch.Tensor, "n k"]:
        """The model's own top-K (layer ``L``)."""
        return self.lens_topk[-1]

    @property
    def top_two_gap(self) -> Float[torch.Tensor, "layers n"]:
        """The lens's confidence ``p(1) − p(2)`` at every layer (float64)."""
        return (self.lens_topp[..., 0] - self.lens_topp[..., 1]).double()

    def targets(self, corpus: Tokenized) -> Int[torch.Tensor, "n"]:
        """The token each ranked position is scored against, from the ``corpus`` it was ranked on:
        the original token at a masked position (masked protocol), else the actual next token
        (−1 at the end of a line)."""
        shift = int(corpus.masking is None)
        seqs = corpus.seqs
        return torch.tensor([seqs[line][pos + shift] if pos + shift < len(seqs[line]) else -1
                             for line, pos in self.origin])


@torch.no_grad()
def collect_rankings(model, lens, corpus: Tokenized, *, k: int = 5, batch_size: int = 16,
                     max_tokens: int | None = None, keep_resid: bool = True, progress: bool = True) -> Rankings:
    """Run ``corpus`` (:meth:`~lensmat.stats.pipeline.Tokenized.batches`, so a masked LM reads its lines
    with their ``[MASK]`` positions) and record the lens's top-``k`` at every layer at its scored
    positions (up to ``max_tokens`` of them), every layer of a batch in one pass of the readout engine
    (:func:`lensmat.lenses.engine.read`; equal logits are ranked by the lowest id)."""
    from tqdm.auto import tqdm

    n_layers = int(model.cfg.n_layers)
    hooks = resid_hooks(n_layers)
    unembedding, device = engine.Unembedding(model), model_device(model)
    tops, probs, resids, origin, inputs = [], [], [], [], {}
    bar = tqdm(total=corpus.n_tokens(max_tokens), unit="tok", unit_scale=True, desc="rankings", disable=not progress)
    for batch in corpus.batches(batch_size, max_tokens):
        lines = batch.lines  # each row's index in corpus.seqs (batching skips lines with nothing to score)
        captured, _ = run_capture(model, batch, hooks)
        last = captured[hooks[-1]].to(device)  # layer L reads the model itself, as a layer the lens does not cover
        rows = [lens.transform_hidden(captured[h].to(device), layer) if lens.covers(layer) else last
                for layer, h in enumerate(hooks[:-1])]
        readout = engine.read(unembedding, torch.stack([*rows, last]), k=k)
        tops.append(readout.top_ids.cpu())
        probs.append(readout.top_probs.cpu())
        if keep_resid:
            resids.append(torch.stack([captured[h].float().cpu() for h in hooks]))
        rows, cols = batch.score_mask.nonzero(as_tuple=True)
        origin += [(lines[int(r)], int(c)) for r, c in zip(rows, cols)]
        inputs |= {line: batch.tokens[r, : int(batch.attention_mask[r].sum())].tolist() for r, line in enumerate(lines)}
        bar.update(batch.n_scored)
    bar.close()
    if not tops:
        raise ValueError("No tokens to rank: the corpus split is empty.")
    return Rankings(torch.cat(tops, 1), torch.cat(probs, 1), torch.cat(resids, 1) if keep_resid else None, origin,
                    inputs)


def saturation_layers(lens_topk: Int[torch.Tensor, "layers n k"], final_topk: Int[torch.Tensor, "n k"],
                      start: int = 0) -> Int[torch.Tensor, "n k"]:
    """``s_k`` per token and rank: the first layer ``≥ start`` of the trailing run of layers whose
    rank-k token equals ``final_topk``; ``layers`` (one past the last) where even the last layer
    differs. The saturation protocol reads block outputs only (``start=1``)."""
    match = lens_topk == final_topk[None]
    trailing = match.flip(0).to(torch.int64).cumprod(0).sum(0)
    return (lens_topk.shape[0] - trailing).clamp_min(start)
