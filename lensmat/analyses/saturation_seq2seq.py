"""Top-k saturation in the decoder of an encoder-decoder model ("Looking Beyond the Top-1", Lioubashevski et al.
2024, on Whisper-style speech recognisers and T5-style text models; :mod:`lensmat.models.seq2seq`).

The protocol is the text one (:mod:`lensmat.analyses.saturation`) at the decoder's positions under teacher
forcing, as the authors' Whisper code reads them (``model(input_features, decoder_input_ids=<the reference
transcript>)``, every decoder position ranked): each held-out example's encoder input (speech features, or
token ids) and its reference output fed to the decoder (``[start] + target[:-1]``); at every decoder position
the lens's top-``k`` at every decoder residual layer ``0..L`` (layer ``L`` the model's own output),
``s_k`` with ``saturation_layers(..., start=1)``, then :func:`~lensmat.analyses.saturation.order_statistics`
with one document per example (utterance). The lenses: ``logit`` (the decoder's final norm and LM head on
``h_l``, the authors' readout) and ``mat`` (``h_l @ A_{l→L}``, least squares fitted on the ``train`` split's
decoder positions with :mod:`lensmat.stats`, no intercept). The implant intervention is not run on these
models (the report's intervention fields are null).
"""

from __future__ import annotations

import time

import torch

from lensmat.analyses.saturation import ORDER_RULES, order_statistics
from lensmat.analyses.saturation_rankings import saturation_layers
from lensmat.data.seq2seq import Seq2SeqData, seq2seq_examples
from lensmat.lenses import engine
from lensmat.models import describe
from lensmat.models.seq2seq import is_seq2seq_model
from lensmat.stats.bootstrap import Bootstrap
from lensmat.stats.collect import resid_hooks
from lensmat.stats.fit import LinearMap, fit_to_last

SEQ2SEQ_LENSES = ("logit", "mat")
DEFAULT_FIT_POSITIONS = 10_000  # train decoder positions for the mat lens when max_fit_tokens is not given


@torch.no_grad()
def decoder_states(model, data: Seq2SeqData, *, batch_size: int = 16):
    """Yield ``(resid [L+1, n, d_model], documents [n], targets [n])`` per batch of ``data``: the decoder's
    residual stream ``h_0..h_L`` at the scored positions (teacher forcing), float32 on the model's device."""
    hooks = resid_hooks(int(model.cfg.n_layers))
    for batch in data.batches(batch_size, int(model.cfg.decoder_start_token_id), int(model.cfg.pad_token_id)):
        _, cache = model.run_with_cache(batch.encoder_input, batch.decoder_input_ids, batch.encoder_attention_mask,
                                        names_filter=hooks)
        mask = batch.score_mask.to(model.device)
        resid = torch.stack([cache[h][mask].float() for h in hooks])
        rows = mask.nonzero(as_tuple=True)[0].cpu()
        yield resid, torch.tensor(batch.documents)[rows], batch.targets[batch.score_mask]


def fit_decoder_maps(model, data: Seq2SeqData, *, batch_size: int = 16, intercept: bool = False
                     ) -> tuple[dict[tuple[str, str], LinearMap], int]:
    """Least-squares maps ``h_l -> h_L`` (``l < L``) of the decoder, from float64 statistics of ``data``'s
    decoder positions (:func:`lensmat.stats.fit.fit_to_last`).
    Returns the maps and the number of positions they were fitted on."""
    return fit_to_last((resid for resid, _, _ in decoder_states(model, data, batch_size=batch_size)),
                       tuple(resid_hooks(int(model.cfg.n_layers))), intercept=intercept,
                       what=f"train decoder positions of {model.cfg.model_name}")


@torch.no_grad()
def seq2seq_accuracy(model, data: Seq2SeqData, *, batch_size: int = 32) -> dict:
    """Held-out quality of an encoder-decoder model on ``data``: ``exact_match`` (the share of examples whose
    greedy output, up to the end token, equals the reference) and ``token_accuracy`` (teacher forcing: the
    share of decoder positions whose top-1 is the reference token, the end token included)."""
    start, pad = int(model.cfg.decoder_start_token_id), int(model.cfg.pad_token_id)
    exact = right = positions = 0
    for batch in data.batches(batch_size, start, pad):
        logits = model(batch.encoder_input, batch.decoder_input_ids, batch.encoder_attention_mask)
        mask = batch.score_mask.to(logits.device)
        right += int((logits.argmax(-1) == batch.targets.to(logits.device))[mask].sum())
        positions += int(mask.sum())
        outputs = model.greedy(batch.encoder_input, batch.targets.shape[1] + 2, batch.encoder_attention_mask)
        for out, row in zip(outputs, batch.targets.tolist()):
            exact += out == [t for t in row if t >= 0][:-1]  # the reference without its end token
    n = len(data.examples)
    return {"exact_match": exact / n, "token_accuracy": right / positions, "n_examples": n, "n_positions": positions}


def saturation_seq2seq(model, dataset: str | None = None, *, lens: str = "logit", k: int = 5,
                       max_fit_tokens: int | None = None, max_eval_tokens: int | None = 5_000, frac: float = 0.85,
                       n_permutations: int = 1000, order_rule: str = "authors", batch_size: int = 16,
                       bootstrap: Bootstrap | None = None, progress: bool = True, seed: int = 0, **ignored) -> dict:
    """The saturation protocol in an encoder-decoder model's decoder (module docstring); returns the
    ``saturation`` report with the text protocol's fields plus ``modality`` (``"speech"`` / ``"text"``),
    ``architecture`` (``"encoder-decoder"``), ``protocol`` (``"teacher-forced"``), ``dataset`` (what was
    read: task, source, counts), ``n_documents``, and for the mat lens ``n_fit_tokens``.

    ``max_eval_tokens`` / ``max_fit_tokens`` count decoder positions (held-out / train; the mat lens fits on
    :data:`DEFAULT_FIT_POSITIONS` when not given). The inputs are the model's own (:mod:`lensmat.data.seq2seq`):
    ``dataset`` must be ``None``. The text protocol's other keywords (``max_pairs``, masking, memory planning,
    ``max_length``) do not apply and are ignored; the implant intervention is not run (its fields are null)."""
    if not is_seq2seq_model(model):
        raise TypeError(f"saturation_seq2seq reads an encoder-decoder model (lensmat.models.seq2seq); got {type(model).__name__}.")
    if lens not in SEQ2SEQ_LENSES:
        raise ValueError(f"The {lens!r} lens is not defined for an encoder-decoder model's decoder; valid: "
                         f"{', '.join(SEQ2SEQ_LENSES)}.")
    if order_rule not in ORDER_RULES:
        raise ValueError(f"Unknown order rule {order_rule!r}; valid: {', '.join(ORDER_RULES)}.")
    if dataset is not None:
        raise ValueError(f"{model.cfg.model_name} reads its own inputs ({model.inputs.get('task')}: docs/modalities.md); "
                         f"a text corpus ({dataset!r}) does not apply. Leave the dataset out.")
    if not 1 <= k < int(model.cfg.d_vocab):
        raise ValueError(f"k={k} ranks cannot be followed in a vocabulary of {model.cfg.d_vocab} tokens; "
                         f"use 1 <= k < {model.cfg.d_vocab}.")
    for name, value in (("max_eval_tokens", max_eval_tokens), ("max_fit_tokens", max_fit_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: count at least one decoder position.")
    started = time.perf_counter()
    n_layers = int(model.cfg.n_layers)
    maps, n_fit = None, None
    if lens == "mat":
        train = seq2seq_examples(model, "train", max_positions=max_fit_tokens or DEFAULT_FIT_POSITIONS)
        maps, n_fit = fit_decoder_maps(model, train, batch_size=batch_size)
    heldout = seq2seq_examples(model, "heldout", max_positions=max_eval_tokens)
    unembedding, hooks = model.unembedding(), resid_hooks(n_layers)
    tops, resids, docs = [], [], []
    for resid, documents, _ in decoder_states(model, heldout, batch_size=batch_size):
        rows = [resid[layer] if maps is None else maps[(hooks[layer], hooks[-1])](resid[layer])
                for layer in range(n_layers)]
        readout = engine.read(unembedding, torch.stack([*rows, resid[-1]]), k=k)
        tops.append(readout.top_ids.cpu())
        resids.append(resid.cpu())
        docs.append(documents)
    if not tops:
        raise ValueError(f"No held-out decoder positions to rank for {model.cfg.model_name}.")
    top_ids, resid, docs = torch.cat(tops, 1), torch.cat(resids, 1), torch.cat(docs)
    s = saturation_layers(top_ids, top_ids[-1], start=1)
    report = {"model": describe(model).name, "n_layers": n_layers, "lens": lens, "k": k,
              "modality": model.modality, "architecture": model.architecture, "protocol": "teacher-forced",
              "dataset": heldout.description, "n_documents": len(heldout.examples),
              **order_statistics(s, docs, resid, n_layers, frac=frac, n_permutations=n_permutations,
                                 order_rule=order_rule, seed=seed, bootstrap=bootstrap),
              "intervention_success": None, "intervention_trials": None, "intervention_sweep": None,
              "intervention_note": "the implant intervention is not run on encoder-decoder models"}
    if lens == "mat":
        report["n_fit_tokens"] = n_fit
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
