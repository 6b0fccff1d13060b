"""A lens is a ``torch.nn.Module``: devices, state dicts, gradients, and interoperability with
TransformerLens's ``logit_lens`` and the tuned-lens package's ``PredictionTrajectory``."""

import math

import os

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.lenses.base import Lens, LogitLens, MatLens, tl_translator
from lensmat.lenses.jacobian import JLens
from lensmat.lenses.metrics import evaluate_lenses
from lensmat.lenses.registry import parse_lenses, split_lenses
from lensmat.lenses.tuned import TunedLens, translator_init
from lensmat.models import describe
from lensmat.stats.collect import resid_hook
from lensmat.stats.fit import LinearMap, MapSet


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(n_layers=3, d_model=16)


def random_maps(model, intercept: bool = True, seed: int = 0) -> MapSet:
    """Affine maps ``h_l -> h_L`` near the identity (as fitted maps are), for every ``l < L``."""
    g = torch.Generator().manual_seed(seed)
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    maps = {(resid_hook(l), resid_hook(L)): LinearMap(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g),
                                                      0.3 * torch.randn(d, generator=g) if intercept else None,
                                                      resid_hook(l), resid_hook(L)) for l in range(L)}
    return MapSet(maps, describe(model).to_dict(), intercept=intercept)


def lenses_of(model) -> dict[str, Lens]:
    maps = random_maps(model)
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(3, 16, 16, generator=g) * 0.1, torch.randn(3, 16, generator=g) * 0.1
    return {"logit": LogitLens(model), "mat": MatLens(model, random_maps(model, intercept=False)),
            "mat-affine": MatLens(model, maps), "tuned": TunedLens(model, W, b),
            "mat-tuned": TunedLens(model, *translator_init(model, maps), name="mat-tuned")}


def test_model_weights_stay_out_of_the_module_tree(model):
    for name, lens in lenses_of(model).items():
        assert lens.model is model and "model" not in dict(lens.named_children()), name
        keys = set(lens.state_dict())
        assert not any("blocks" in k or "embed" in k or k.startswith("model") for k in keys), (name, keys)
        assert not any(p is q for p in lens.parameters() for q in model.parameters()), name
    assert set(lenses_of(model)["tuned"].state_dict()) == {"W", "b"}
    assert set(lenses_of(model)["mat-affine"].state_dict()) == {f"{p}_{l}" for p in "Wb" for l in range(3)}
    assert lenses_of(model)["logit"].state_dict() == {}


def test_to_moves_the_lens_not_the_model(model):
    h = torch.randn(2, 4, 16)
    for name, lens in lenses_of(model).items():
        with torch.no_grad():
            before = lens(h, 1)
        lens.to(torch.float64)
        assert all(t.dtype == torch.float64 for t in lens.state_dict().values()), name
        assert all(p.dtype == torch.float32 for p in model.parameters()), name
        with torch.no_grad():
            torch.testing.assert_close(lens(h, 1), before, atol=1e-5, rtol=1e-5)
    if torch.cuda.is_available():
        lens = lenses_of(model)["tuned"].to("cuda")
        assert lens.W.is_cuda and next(model.parameters()).device.type == "cpu"


def test_state_dict_round_trip(model):
    h = torch.randn(2, 4, 16)
    source = lenses_of(model)
    targets = {"mat": MatLens(model, random_maps(model, intercept=False, seed=7)),
               "mat-affine": MatLens(model, random_maps(model, seed=7)), "tuned": TunedLens(model),
               "mat-tuned": TunedLens(model, name="mat-tuned")}
    with torch.no_grad():
        for name, target in targets.items():
            assert not torch.allclose(target(h, 0), source[name](h, 0)), name
            target.load_state_dict(source[name].state_dict())
            for layer in range(4):
                torch.testing.assert_close(target(h, layer), source[name](h, layer))
    assert torch.equal(targets["mat"].maps.get(resid_hook(0), resid_hook(3)).W, source["mat"].W_0)  # maps follow the buffers


def test_jlens_buffers_are_what_transformer_lens_transports(model):
    from transformer_lens.tools.analysis import JacobianLens

    g = torch.Generator().manual_seed(0)
    jac = {j: torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g) for j in range(2)}
    lens = JLens(model, JacobianLens(jac, n_prompts=1, d_model=16))
    other = JLens(model, JacobianLens({j: torch.eye(16) for j in range(2)}, n_prompts=1, d_model=16))
    assert set(lens.state_dict()) == {"J_0", "J_1"}
    h = torch.randn(3, 16)
    with torch.no_grad():
        other(h, 1)  # fills TransformerLens's device cache with the old matrix
        other.load_state_dict(lens.state_dict())
        torch.testing.assert_close(other(h, 1), lens(h, 1))
        lens.to(torch.float64)
        assert lens.jlens.jacobians[0].dtype == torch.float64


@pytest.mark.parametrize("name", ["logit", "mat", "mat-affine", "tuned", "mat-tuned"])
def test_gradients_flow_unless_the_caller_disables_them(model, name):
    lens = lenses_of(model)[name]
    h = torch.randn(2, 4, 16).requires_grad_()
    for layer in range(4):
        h.grad = None
        lens(h, layer).pow(2).sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0, layer
    if name.endswith("tuned"):
        assert lens.W.grad is not None and lens.W.grad.abs().sum() > 0
    with torch.inference_mode():
        assert not lens(h, 0).requires_grad
    with torch.no_grad():
        assert not lens(h, 0).requires_grad


class Doubled(Lens):
    """A user lens defining only ``transform_hidden``."""

    name = "doubled"

    def transform_hidden(self, h, layer):
        return 2 * h


class Legacy(Lens):
    """A lens written against the old interface (``transform``)."""

    name = "legacy"

    def transform(self, h, layer):
        return 2 * h


def test_user_subclasses_and_the_deprecated_transform(model):
    h = torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(Legacy(model)(h, 1), Doubled(model)(h, 1))
    mat = lenses_of(model)["mat-affine"]
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(mat.transform(h, 1), mat.transform_hidden(h, 1))

    class Neither(Lens):
        pass

    with pytest.raises(TypeError, match="transform_hidden"):
        Neither(model)


def test_lens_specifications(model):
    d = Doubled(model)
    assert parse_lenses("logit, mat") == ["logit", "mat"]
    assert split_lenses(["logit", d]) == (["logit", "doubled"], {"doubled": d})
    assert split_lenses({"mine": d}) == (["mine"], {"mine": d})
    with pytest.raises(ValueError, match="Unknown"):
        parse_lenses(["logit", "nope"])
    with pytest.raises(ValueError, match="twice"):
        parse_lenses([d, Doubled(model)])
    with pytest.raises(TypeError):
        parse_lenses({"mine": "logit"})


def test_evaluate_lenses_scores_a_user_lens(model):
    class Same(Lens):
        name = "same"

        def transform_hidden(self, h, layer):
            return h

    batches = random_token_batches(2, 4, 12, 40, seed=2)
    scores, _, _ = evaluate_lenses(model, {"logit": LogitLens(model), "same": Same(model), "doubled": Doubled(model)},
                                   batches, progress=False)
    assert scores["same"] == scores["logit"]
    assert all(math.isfinite(v) for v in scores["doubled"]["kl"])


@pytest.mark.parametrize("name", ["logit", "mat-affine", "mat-tuned"])
def test_transformer_lens_logit_lens_reads_a_lensmat_lens(model, name):
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    lens = lenses_of(model)[name]
    tokens = torch.tensor([[0, 5, 7, 9, 11, 3]])
    result = logit_lens(model, tokens, positions=None, lens=tl_translator(lens))
    _, cache = model.run_with_cache(tokens)
    assert result.values.shape[0] == 4  # residual layers 0..L
    with torch.no_grad():
        for layer in range(4):
            ours = lens(cache[resid_hook(layer)], layer)
            assert torch.equal(result.values[layer].argmax(-1), ours.argmax(-1)), layer
            torch.testing.assert_close(result.values[layer], ours, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="post"):
        tl_translator(LogitLens(model, site="mid"))


@pytest.mark.parametrize("name", ["mat-affine", "mat-tuned", "tuned"])
def test_tuned_lens_package_prediction_trajectory(tiny_gpt2, name):
    try:
        from tuned_lens.plotting import PredictionTrajectory
    except ImportError:  # CI installs it (.ci/run); a plain checkout may not have it
        if os.environ.get("CI"):
            raise
        pytest.skip("the tuned-lens package (and plotly) is not installed: pip install --no-deps tuned-lens==0.2.0 "
                    "simple-parsing flatten-dict docstring-parser plotly")

    bridge = tiny_gpt2[0]
    lens = lenses_of_gpt2(bridge)[name]
    ids = [48, 3, 17, 5, 22, 9]
    traj = PredictionTrajectory.from_lens_and_model(lens, bridge.original_model, ids)
    L = int(bridge.cfg.n_layers)
    assert traj.log_probs.shape == (L + 1, len(ids), int(bridge.cfg.d_vocab))
    tokens = torch.tensor([ids])
    logits, cache = bridge.run_with_cache(tokens)
    with torch.no_grad():
        for layer in range(L):
            ours = torch.log_softmax(lens(cache[resid_hook(layer)], layer)[0].float(), -1)
            torch.testing.assert_close(torch.from_numpy(traj.log_probs[layer]), ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(traj.log_probs[L]), torch.log_softmax(logits[0].float(), -1),
                               atol=1e-4, rtol=1e-4)


def lenses_of_gpt2(bridge) -> dict[str, Lens]:
    maps = random_maps(bridge)
    g = torch.Generator().manual_seed(1)
    L, d = int(bridge.cfg.n_layers), int(bridge.cfg.d_model)
    return {"mat-affine": MatLens(bridge, maps), "mat-tuned": TunedLens(bridge, *translator_init(bridge, maps),
                                                                        name="mat-tuned"),
            "tuned": TunedLens(bridge, 0.1 * torch.randn(L, d, d, generator=g), 0.1 * torch.randn(L, d, generator=g))}


def test_compare_scores_lens_objects(tiny_gpt2):
    import lensmat

    model, _, corpus = tiny_gpt2

    class Same(Lens):
        name = "same"

        def transform_hidden(self, h, layer):
            return h

    tiny = dict(max_fit_tokens=400, max_eval_tokens=150, max_length=24, progress=False)
    r = lensmat.compare(model, str(corpus), lenses=["logit", Same(model), "mat"], **tiny)
    assert list(r["lenses"]) == ["logit", "same", "mat"]
    assert r["lenses"]["same"] == r["lenses"]["logit"] and r["fit_cost"]["same"]["reused"] is True
    r2 = lensmat.compare(model, str(corpus), lenses={"mine": Doubled(model)}, **tiny)
    assert list(r2["lenses"]) == ["mine"] and r2["n_fit_tokens"] == r["n_fit_tokens"] > 0
