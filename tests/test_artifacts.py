"""Every saved artifact is checked on load: model identity, index, tensor keys, dtype, shapes, finite values."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model, random_token_batches
from lensmat.stats import artifacts as io
from lensmat.stats.collect import collect, resid_hooks
from lensmat.stats.fit import LinearMap, MapSet, fit_layer_maps, fit_pairs
from lensmat.lenses.importers import import_paper_maps
from lensmat.stats.artifacts import ArtifactError
from lensmat.lenses.jacobian import JLens
from lensmat.models import ModelMismatchError, describe
from lensmat.analyses.submodules import groups_for, submodule_pairs
from lensmat.lenses.tuned import TunedLens


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(n_layers=3, d_model=16)


@pytest.fixture(scope="module")
def maps(model):
    stats = collect(model, random_token_batches(3, 8, 12, 40), [resid_hooks(3)], progress=False)[0]
    return MapSet(fit_layer_maps(stats, intercept=True, all_pairs=True), describe(model).to_dict(), intercept=True)


def edited(path, tensors=None, **meta):
    """``path`` with its tensors edited by ``tensors(dict)`` and its meta.json fields replaced by ``meta``."""
    tensor_file = next(path.glob("*.safetensors"))
    if tensors is not None:
        saved = load_file(tensor_file)
        tensors(saved)
        save_file(saved, tensor_file)
    (path / "meta.json").write_text(json.dumps({**json.loads((path / "meta.json").read_text()), **meta}))
    return path


def test_maps_whose_index_is_swapped_repeated_or_foreign_are_refused(model, maps, tmp_path):
    pairs = [list(p) for p in maps.maps]  # h_0 -> h_1 first
    cases = {
        "swapped": ([pairs[0][::-1], *pairs[1:]], r"pair 0 \(blocks.0.hook_resid_post -> blocks.0.hook_resid_pre\) "
                                                  "does not go forward along the residual stream"),
        "twice": ([*pairs[:-1], pairs[0]], r"pair 5 \(blocks.0.hook_resid_pre -> blocks.0.hook_resid_post\) is listed twice"),
        "deeper": ([["blocks.0.hook_resid_pre", "blocks.7.hook_resid_post"], *pairs[1:]], "a block outside 0..2"),
    }
    for name, (index, match) in cases.items():
        path = edited(io.save_maps(maps, tmp_path / name), pairs=index)
        for given in (None, model):
            with pytest.raises(ArtifactError, match=match):
                io.load_maps(path, given)
    path = edited(io.save_maps(maps, tmp_path / "unknown"), pairs=[["blocks.0.hook_nothing", pairs[0][1]], *pairs[1:]])
    with pytest.raises(ArtifactError, match="pair 0 names 'blocks.0.hook_nothing', which is not a hook of this model"):
        io.load_maps(path, model)


def test_maps_with_integer_or_non_finite_tensors_are_refused(model, maps, tmp_path):
    def to_int(t):
        t["2.W"] = t["2.W"].long()

    def nan(t):
        t["3.b"][5] = float("nan")

    for name, damage, match in [
        ("int", to_int, r"2.W \(the map blocks.0.hook_resid_pre -> blocks.2.hook_resid_post\) has dtype torch.int64"),
        ("nan", nan, r"3.b \(the intercept of blocks.0.hook_resid_post -> blocks.1.hook_resid_post\) holds 1 NaN/Inf "
                     r"value\(s\), the first at index \(5,\)"),
    ]:
        path = edited(io.save_maps(maps, tmp_path / name), damage)
        for given in (None, model):
            with pytest.raises(ArtifactError, match=match):
                io.load_maps(path, given)


def test_maps_tensors_must_be_exactly_those_their_index_lists(maps, tmp_path):
    def extra(t):
        t["9.W"] = torch.zeros(16, 16)

    def no_bias(t):
        del t["1.b"]

    def narrow_bias(t):
        t["0.b"] = t["0.b"][:8]

    def wide(t):
        t["4.W"] = torch.zeros(16, 20)

    for name, damage, match in [("extra", extra, r"unexpected \['9.W'\]"), ("nobias", no_bias, r"missing \['1.b'\]"),
                                ("narrow", narrow_bias, "0.b .* has shape 8, expected 16"),
                                ("wide", wide, "4.W .* has shape 16x20, expected 16x16")]:
        with pytest.raises(ArtifactError, match=match):
            io.load_maps(edited(io.save_maps(maps, tmp_path / name), damage))  # no model: checked against its meta.json


def test_submodule_maps_are_checked_against_the_model_hook_widths(model, tmp_path):
    pairs = submodule_pairs(model)
    stats = collect(model, random_token_batches(3, 8, 12, 40), groups_for(pairs), progress=False)
    fitted = MapSet(fit_pairs(stats, pairs, intercept=True, ridge=1e-3), describe(model).to_dict(), intercept=True)
    loaded = io.load_maps(io.save_maps(fitted, tmp_path / "sub"), model)  # widths measured by a one-token forward
    assert loaded.maps.keys() == fitted.maps.keys()
    pair = ("blocks.0.ln1.hook_out", "blocks.0.hook_attn_out")
    narrow = MapSet({pair: LinearMap(torch.zeros(8, 8), None, *pair)}, describe(model).to_dict())
    path = io.save_maps(narrow, tmp_path / "narrow")
    io.load_maps(path)  # consistent in itself: without a model nothing says these hooks are 16 wide
    with pytest.raises(ArtifactError, match=r"0.W \(the map blocks.0.ln1.hook_out -> blocks.0.hook_attn_out\) has "
                                            "shape 8x8, expected 16x16"):
        io.load_maps(path, model)


def test_tuned_lens_with_bad_tensors_is_refused(model, tmp_path):
    lens = TunedLens(model, 0.1 * torch.randn(3, 16, 16), 0.1 * torch.randn(3, 16))

    def nan(t):
        t["W"][1, 2, 3] = float("inf")

    def to_int(t):
        t["b"] = t["b"].int()

    def short(t):
        t["W"] = t["W"][:2]

    def no_bias(t):
        del t["b"]

    for name, damage, match in [("nan", nan, r"W holds 1 NaN/Inf value\(s\), the first at index \(1, 2, 3\)"),
                                ("int", to_int, "b has dtype torch.int32"),
                                ("short", short, "W has shape 2x16x16, expected 3x16x16"),
                                ("nobias", no_bias, r"missing \['b'\]")]:
        with pytest.raises(ArtifactError, match=match):
            TunedLens.load(edited(lens.save(tmp_path / name), damage), model)


def test_tuned_lens_package_with_bad_tensors_is_refused(model, tmp_path):
    config = {"base_model_name_or_path": "tiny", "d_model": 16, "num_hidden_layers": 3, "bias": True,
              "lens_type": "linear_tuned_lens"}
    state = {k: v for i in range(3) for k, v in ((f"{i}.weight", torch.zeros(16, 16)), (f"{i}.bias", torch.zeros(16)))}

    def package(name, **changes):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        torch.save({**state, **changes}, folder / "params.pt")
        return folder

    assert torch.equal(TunedLens.load(package("ok"), model).W, torch.zeros(3, 16, 16))
    with pytest.raises(ArtifactError, match=r"params.pt: 1.bias holds 16 NaN/Inf value\(s\), the first at index \(0,\)"):
        TunedLens.load(package("nan", **{"1.bias": torch.full((16,), float("nan"))}), model)
    with pytest.raises(ArtifactError, match="params.pt: 2.weight has dtype torch.int64"):
        TunedLens.load(package("int", **{"2.weight": torch.zeros(16, 16, dtype=torch.long)}), model)


def tl_lens(d_model=16, layers=(0, 1), metadata=None):
    from transformer_lens.tools.analysis import JacobianLens

    g = torch.Generator().manual_seed(0)
    return JacobianLens({j: torch.eye(d_model) + 0.1 * torch.randn(d_model, d_model, generator=g) for j in layers},
                        n_prompts=1, d_model=d_model, metadata=metadata)


def test_transformer_lens_jlens_file_is_checked_against_the_model(model, tmp_path):
    ok = tmp_path / "ok.pt"
    tl_lens(metadata={"model_name": model.cfg.model_name}).save(str(ok))
    assert JLens.load(ok, model).covers(2)
    for name, lens, match in [("wide", tl_lens(d_model=20), "fitted for d_model=20, but the model has d_model=16"),
                              ("named", tl_lens(metadata={"model_name": "gpt2"}), "fitted for model 'gpt2'"),
                              ("deep", tl_lens(layers=(0, 5)), r"source layers \[5\] outside")]:
        lens.save(str(tmp_path / f"{name}.pt"))
        with pytest.raises(ModelMismatchError, match=f"The J-lens in .*{name}.pt does not fit .*{match}"):
            JLens.load(tmp_path / f"{name}.pt", model)


def test_jlens_files_and_folders_with_bad_matrices_are_refused(model, tmp_path):
    for name, J, match in [("int", torch.ones(16, 16, dtype=torch.long), r"J\[1\] has dtype torch.int64"),
                           ("nan", torch.full((16, 16), float("nan")), r"J\[1\] holds 256 NaN/Inf value\(s\)"),
                           ("shape", torch.zeros(16, 8), r"J\[1\] has shape 16x8, expected 16x16")]:
        torch.save({"J": {0: torch.eye(16), 1: J}, "n_prompts": 1, "d_model": 16}, tmp_path / f"{name}.pt")
        with pytest.raises(ArtifactError, match=match):
            JLens.load(tmp_path / f"{name}.pt", model)
    torch.save({"weights": torch.eye(16)}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="is not a TransformerLens J-lens"):
        JLens.load(tmp_path / "other.pt", model)
    lens = JLens(model, tl_lens())

    def nan(t):
        t["J.1"][0, 0] = float("nan")

    def extra(t):
        t["K.0"] = torch.eye(16)

    def deep(t):
        t["J.5"] = t.pop("J.1")

    for name, damage, match in [("nan", nan, r"J.1 holds 1 NaN/Inf value\(s\), the first at index \(0, 0\)"),
                                ("extra", extra, r"unexpected \['K.0'\]")]:
        with pytest.raises(ArtifactError, match=match):
            JLens.load(edited(lens.save(tmp_path / name), damage), model)
    with pytest.raises(ModelMismatchError, match=r"source layers \[5\] outside"):
        JLens.load(edited(lens.save(tmp_path / "deep"), deep), model)


def test_imported_matrices_must_be_finite_floats_given_once(model, tmp_path):
    for name, A, match in [("nan", np.full((16, 16), np.nan, dtype=np.float32), r"its matrix holds 256 NaN/Inf value\(s\)"),
                           ("int", np.ones((16, 16), dtype=np.int64), "its matrix has dtype torch.int64")]:
        folder = tmp_path / name
        folder.mkdir()
        pickle.dump(A, open(folder / "0_3.pickle", "wb"))
        with pytest.raises(ArtifactError, match=f"0_3.pickle: {match}"):
            import_paper_maps(folder, model)
    for stem in ("0_3", "00_3"):
        pickle.dump(torch.eye(16), open(tmp_path / f"{stem}.pickle", "wb"))
    with pytest.raises(ArtifactError, match="0_3.pickle and 00_3.pickle both hold the map 0 -> 3"):
        import_paper_maps(tmp_path, model)


def test_a_refused_torch_file_is_named_without_torch_s_advice_to_run_it(tmp_path):
    """torch's weights_only refusal advises loading with weights_only=False (which runs the file's code);
    lensmat's message keeps only the reason, in one line."""
    from lensmat.lenses.importers import load_tensor_pickle

    torch.save({"0.weight": _Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError) as err:
        load_tensor_pickle(tmp_path / "evil.pt")
    message = str(err.value)
    assert "Unsupported global" in message and "_Opaque" in message and "weights_only=True" in message
    assert "weights_only` set to `False`" not in message and "\n" not in message and "\x1b" not in message
    payload = tmp_path / "bytes.pickle"

    class Smuggler:
        def __reduce__(self):
            import io as stdio

            import torch.storage

            buffer = stdio.BytesIO()
            torch.save(_Opaque(), buffer, _use_new_zipfile_serialization=False)
            return (torch.storage._load_from_bytes, (buffer.getvalue(),))

    payload.write_bytes(pickle.dumps(Smuggler()))
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global") as err:
        load_tensor_pickle(payload)
    assert "False" not in str(err.value)


class _Opaque:
    """An object that is not tensor data."""
