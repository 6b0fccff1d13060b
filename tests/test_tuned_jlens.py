"""Tuned lens and J-lens: invariants and agreement with TransformerLens."""

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat import data
from lensmat.stats.collect import collect, resid_hooks
from lensmat.stats.fit import MapSet, fit_layer_maps
from lensmat.lenses.jacobian import JLens
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import evaluate_lenses
from lensmat.models import ModelMismatchError, describe
from lensmat.stats.pipeline import Tokenized
from lensmat.lenses.tuned import TunedLens, TunedLensTraining, train_tuned_lens


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(n_layers=3, d_model=16)


def tiny_corpus(seed):
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist()
            for b in random_token_batches(12, 8, 20, 40, seed=seed) for i in range(8)]
    return Tokenized(seqs, "random", "train", 20)


@torch.no_grad()
def test_tuned_lens_at_init_is_the_logit_lens(model):
    h = torch.randn(2, 5, 16)
    tuned, logit = TunedLens(model), LogitLens(model)
    for layer in range(4):
        assert torch.equal(tuned(h, layer), logit(h, layer))


def test_tuned_lens_training_lowers_heldout_kl_and_round_trips(model, tmp_path):
    lens = train_tuned_lens(model, tiny_corpus(1), TunedLensTraining(tokens=6000, batch_size=8, lr=0.5), progress=False)
    held = list(data.batches(tiny_corpus(2).seqs, 16))
    scores, _, _ = evaluate_lenses(model, {"logit": LogitLens(model), "tuned": lens}, held, progress=False)
    for layer in range(3):
        assert scores["tuned"]["kl"][layer] < scores["logit"]["kl"][layer], layer
    assert scores["tuned"]["kl"][3] == pytest.approx(0.0, abs=1e-5)
    lens.save(tmp_path / "tuned")
    again = TunedLens.load(tmp_path / "tuned", model)
    assert torch.equal(again.W, lens.W) and again.meta["config"]["tokens"] == 6000
    with pytest.raises(ModelMismatchError):
        TunedLens.load(tmp_path / "tuned", make_tiny_model(n_layers=3, d_model=16, seed=5))


def affine_maps(model, corpus):
    stats = collect(model, corpus.batches(8), [resid_hooks(3)], progress=False)[0]
    return MapSet(fit_layer_maps(stats, intercept=True), describe(model).to_dict(), intercept=True)


def test_mat_tuned_starts_as_the_affine_mat_lens_and_training_lowers_its_kl(model, tmp_path):
    train = tiny_corpus(1)
    maps = affine_maps(model, train)
    start = train_tuned_lens(model, train, TunedLensTraining(tokens=0), init=maps, progress=False)
    assert start.name == "mat-tuned"
    h = torch.randn(2, 5, 16)
    mat = MatLens(model, maps)
    with torch.no_grad():
        for layer in range(4):
            torch.testing.assert_close(start(h, layer), mat(h, layer), atol=1e-4, rtol=1e-4)
    trained = train_tuned_lens(model, train, TunedLensTraining(tokens=6000, batch_size=8, lr=0.05), init=maps,
                               progress=False)
    on_train = list(train.batches(16))
    scores, _, _ = evaluate_lenses(model, {"start": start, "trained": trained}, on_train, progress=False)
    assert sum(scores["trained"]["kl"][:3]) < sum(scores["start"]["kl"][:3])
    assert trained.meta["init"]["intercept"] is True
    trained.save(tmp_path / "mat-tuned")
    again = TunedLens.load(tmp_path / "mat-tuned", model)
    assert again.name == "mat-tuned" and torch.equal(again.b, trained.b)


@torch.no_grad()
def test_jlens_wrapper_equals_transformer_lens_readout(model, tmp_path):
    from transformer_lens.tools.analysis import JacobianLens

    g = torch.Generator().manual_seed(0)
    jac = {j: torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g) for j in range(2)}
    tl = JacobianLens(jac, n_prompts=1, d_model=16)
    lens = JLens(model, tl)
    tokens = torch.tensor([[0, 5, 7, 9, 11]])
    direct = tl.readout(model, tokens, return_full_logits=True).lens_logits
    _, cache = model.run_with_cache(tokens)
    for j in range(3):  # TransformerLens's block-output index j is residual layer j + 1
        ours = lens(cache[f"blocks.{j}.hook_resid_post"], j + 1)[0]
        assert (ours - direct[j]).abs().max() < 1e-5
    assert not lens.covers(0) and lens.covers(3)
    lens.save(tmp_path / "jl")
    again = JLens.load(tmp_path / "jl", model)
    assert torch.equal(again.jlens.jacobians[1], lens.jlens.jacobians[1].float())


@torch.no_grad()
def test_affine_mat_lens_equals_affine_least_squares(model):
    batches = random_token_batches(6, 8, 16, 40, seed=3)
    stats = collect(model, batches, [resid_hooks(3)], progress=False)[0]
    maps = MapSet(fit_layer_maps(stats, intercept=True), describe(model).to_dict(), intercept=True)
    X, Y = [], []
    for b in batches:
        _, cache = model.run_with_cache(b.tokens)
        X.append(cache["blocks.0.hook_resid_post"][b.score_mask].double())
        Y.append(cache["blocks.2.hook_resid_post"][b.score_mask].double())
    X, Y = torch.cat(X), torch.cat(Y)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), Y).solution
    lens = MatLens(model, maps)
    assert lens.name == "mat-affine"
    h = torch.randn(7, 16)
    expected = (h.double() @ sol[:-1] + sol[-1]).float()
    assert (lens.transform(h, 1) - expected).abs().max() < 1e-4


def test_jlens_provenance_counts_the_positions_transformer_lens_averages(tiny_llama, tmp_path):
    from lensmat.lenses.jacobian import fit_jlens

    model = tiny_llama[0]
    words = [5, 30, 17, 3, 40]  # the first five train lines; each becomes BOS + its words
    lines = [" ".join(f"w{i % 48}" for i in range(n)) for n in words] + ["w1 w2"] * 5
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n")
    lens = fit_jlens(model, str(corpus), n_prompts=5, max_length=32, skip_first_positions=4, progress=False)
    prov = lens.meta["provenance"]
    lengths = [min(n + 1, 32) for n in words]  # 6, 31, 18, 4, 32
    used = [n for n in lengths if n > 5]  # a prompt needs a position in 4 .. len-2
    assert prov["n_prompts"] == lens.jlens.n_prompts == 4 and prov["n_lines"] == 5
    assert prov["n_tokens"] == sum(used) == 87
    assert prov["n_positions"] == sum(n - 5 for n in used) == 67
    assert prov["skip_first_positions"] == 4


def test_layerwise_backward_gives_the_gradient_of_the_summed_kl(model):
    """kl_backward back-propagates one layer at a time; the result must be the summed loss's gradient."""
    from lensmat.stats.collect import run_capture
    from lensmat.lenses.tuned import kl_backward

    batch = random_token_batches(1, 4, 12, 40, seed=7)[0]
    hooks = resid_hooks(3)[:-1]
    with torch.no_grad():
        captured, logits = run_capture(model, batch, hooks, logits=True)
        logp = torch.log_softmax(logits.float(), -1)
    g = torch.Generator().manual_seed(1)
    W = (0.1 * torch.randn(3, 16, 16, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(3, 16, generator=g)).requires_grad_()
    loss = kl_backward(model, W, b, captured, hooks, logp)
    W2, b2 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    total = 0.0
    for layer, hook in enumerate(hooks):  # the summed loss, read out by hand: ln_final then unembed
        z = captured[hook] + captured[hook] @ W2[layer] + b2[layer]
        logq = torch.log_softmax(model.unembed(model.ln_final(z)), -1)
        total = total + torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="batchmean")
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=1e-5)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-6)
