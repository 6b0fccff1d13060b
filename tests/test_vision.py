"""ViT image classifiers (lensmat.models.vision) and the saturation protocol on images
(lensmat.analyses.saturation_vision): fast tests on a tiny random ViT, slow ones on the bundled vit-digits."""

import json

import pytest
import torch

import lensmat
from lensmat import cli
from lensmat.analyses.saturation_rankings import saturation_layers
from lensmat.analyses.saturation_vision import (cls_residuals, fit_cls_maps, image_saturation_layers, rank_images,
                                                ranked_classes)
from lensmat.data.images import load_images
from lensmat.models import ModelLoadError
from lensmat.models.vision import VIT_BASE_CONFIG, VisionClassifier, modality, to_pixels, vision_spec
from lensmat.stats.collect import resid_hooks

from conftest import strict_json


def save_tiny_vit(folder, n_layers: int = 4, seed: int = 0):
    """A random Hugging Face ViTForImageClassification for 8×8 grey images (2×2 patches, d_model 32, 10
    classes), with random LayerNorm gains and biases (as after training), saved to ``folder``."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, intermediate_size=64,
                       image_size=8, patch_size=2, num_channels=1, num_labels=10, initializer_range=0.2)
    hf = ViTForImageClassification(config).eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    folder = save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))
    return lensmat.load_model(str(folder), device="cpu"), folder


@pytest.fixture(scope="module")
def digit_pixels(tiny_vit):
    model, _ = tiny_vit
    return model.pixel_values(load_images("digits", "heldout").images[:24])


def test_a_local_vit_folder_loads_as_a_vision_classifier(tiny_vit):
    model, folder = tiny_vit
    assert isinstance(model, VisionClassifier)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab, model.cfg.n_ctx) == (4, 32, 10, 17)
    info = lensmat.describe(model)
    assert (info.n_layers, info.d_model, info.d_vocab) == (4, 32, 10)
    assert vision_spec(str(folder)) == (str(folder), folder)
    assert vision_spec(None) is None and vision_spec("reference") is None


def test_the_lens_at_the_last_layer_is_the_models_own_logits(tiny_vit, digit_pixels):
    model, _ = tiny_vit
    hf_logits = model.hf_model(pixel_values=digit_pixels).logits
    resid = cls_residuals(model, digit_pixels)
    assert resid.shape == (5, 24, 32)
    with torch.no_grad():
        lens_logits = model.readout(resid[-1])
        assert torch.allclose(lens_logits, hf_logits, atol=1e-5)
        assert torch.allclose(model(digit_pixels), hf_logits, atol=1e-5)
        # and an earlier layer is not (the lens reads something else there)
        assert not torch.allclose(model.readout(resid[2]), hf_logits, atol=1e-2)


def test_hook_activations_equal_hugging_faces_hidden_states(tiny_vit, digit_pixels):
    """h_l = HF hidden_states[l] for every l = 0..L: in ViT even hidden_states[L] is before the final
    LayerNorm (ViTModel applies it after the encoder), unlike GPT-2's last hidden state."""
    model, _ = tiny_vit
    hidden = model.hf_model(pixel_values=digit_pixels, output_hidden_states=True).hidden_states
    _, cache = model.run_with_cache(digit_pixels, names_filter=lambda n: n in resid_hooks(4))
    assert len(hidden) == 5
    for layer, hook in enumerate(resid_hooks(4)):
        assert torch.allclose(cache[hook], hidden[layer], atol=1e-6), hook
    assert not torch.allclose(hidden[4], model.hf_model.vit.layernorm(hidden[4]), atol=1e-3)


def test_pixel_values_resize_repeat_and_normalise():
    images = torch.rand(3, 1, 8, 8)
    x = to_pixels(images, 8, 1)
    assert torch.allclose(x, (images - 0.5) / 0.5)
    big = to_pixels(images, 32, 3)
    assert big.shape == (3, 3, 32, 32) and torch.equal(big[:, 0], big[:, 2])
    assert torch.allclose(big.mean((-1, -2)), x.mean((-1, -2)).expand(3, 3), atol=0.05)
    with pytest.raises(ValueError, match="Images must be"):
        to_pixels(torch.rand(3, 2, 8, 8), 8, 3)


def test_the_mat_map_of_the_last_layer_to_itself_is_the_identity(tiny_vit):
    """Through lensmat's GramStats / fit_layer_maps: a map from h_L to h_L fitted on the CLS vectors
    is the identity (and the maps to h_L are the least-squares ones, checked against torch.linalg.lstsq)."""
    from lensmat.stats.fit import fit_map
    from lensmat.stats.gram import GramStats

    model, _ = tiny_vit
    train = load_images("digits", "train").head(400)
    resid = cls_residuals(model, model.pixel_values(train.images))  # [5, 400, 32]
    stats = GramStats(("a", "b"), (32, 32))
    stats.update(torch.cat([resid[4], resid[4]], 1))
    ident = fit_map(stats, "a", "b")
    assert torch.allclose(ident.W, torch.eye(32), atol=1e-4)
    maps = fit_cls_maps(model, train, progress=False)
    assert sorted(maps) == [1, 2, 3]  # h_0's CLS vector is the same for every image: no map there
    for layer in (1, 3):
        want = torch.linalg.lstsq(resid[layer].double(), resid[4].double()).solution
        assert torch.allclose(maps[layer].W.double(), want, atol=1e-4 * float(want.abs().max()))


def test_ranked_classes_put_the_lowest_id_first_among_ties():
    ids, p = ranked_classes(torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0]]), 4)
    assert ids.tolist() == [[1, 2, 4, 3]]
    assert float(p[0, 0]) == float(p[0, 1]) == float(p[0, 2]) > float(p[0, 3])


def test_rankings_read_the_model_at_the_last_layer_and_s_k_follows(tiny_vit):
    model, _ = tiny_vit
    images = load_images("digits", "heldout").head(50)
    ranked = rank_images(model, images, k=3, progress=False)
    assert ranked.lens_topk.shape == (5, 50, 3)
    with torch.no_grad():
        logits = model(model.pixel_values(images.images))
    assert torch.equal(ranked.final_topk, ranked_classes(logits, 3)[0])
    s = saturation_layers(ranked.lens_topk, ranked.final_topk, start=1)
    assert int(s.min()) >= 1 and int(s.max()) <= 4
    # s_k is the first layer from which the lens's rank-k class is the final one at every later layer
    for i in range(50):
        for k in range(3):
            layer = int(s[i, k])
            assert bool((ranked.lens_topk[layer:, i, k] == ranked.final_topk[i, k]).all())
            if layer > 1:
                assert int(ranked.lens_topk[layer - 1, i, k]) != int(ranked.final_topk[i, k])


def test_saturation_runs_end_to_end_on_images(tiny_vit, tmp_path):
    model, _ = tiny_vit
    report = lensmat.saturation(model, lens="logit", k=4, max_eval_tokens=120, n_permutations=50,
                                bootstrap=lensmat.Bootstrap(n_resamples=50), progress=False, out=tmp_path / "run")
    assert (report["modality"], report["protocol"], report["lens"], report["k"]) == ("vision", "image", "logit", 4)
    assert report["n_images"] == report["n_tokens"] == 120 and report["dataset"]["name"] == "digits"
    assert report["n_kept"] <= 120 and len(report["mean_layer"]) == 4
    assert all(1 <= v <= 4 for v in report["mean_layer"])
    assert report["intervention_success"] is None and report["intervention_sweep"] is None
    assert report["bootstrap"]["n_documents"] == report["n_kept"]  # one document per image
    assert 0 <= report["heldout_accuracy"] <= 1
    assert len(report["probe_accuracy"]) == 5 and "pooled_probe" in report
    written = strict_json(tmp_path / "run" / "report.json")
    assert written["command"] == "saturation" and written["modality"] == "vision"
    assert (tmp_path / "run" / "saturation.png").is_file()
    back = lensmat.load_report(tmp_path / "run")
    frame = back.to_dataframe()
    assert set(frame[frame.site == "rank"].layer) == {1, 2, 3, 4}


def test_the_mat_lens_runs_on_images(tiny_vit):
    model, _ = tiny_vit
    s, docs, resid, fields = image_saturation_layers(model, lens="mat", k=3, max_fit_images=300, max_images=60,
                                                     progress=False)
    assert s.shape == (60, 3) and docs.tolist() == list(range(60)) and resid.shape == (5, 60, 32)
    assert fields["n_fit_images"] == 300 and fields["lens"] == "mat"
    logit, *_ = image_saturation_layers(model, lens="logit", k=3, max_images=60, progress=False)
    assert int(s.min()) >= 1 and int(logit.min()) >= 1  # block outputs only: h_0 is never read
    assert not torch.equal(s, logit)
    with pytest.raises(ValueError, match="not defined for a vision model"):
        image_saturation_layers(model, lens="tuned", progress=False)


def test_bad_image_requests_are_refused(tiny_vit):
    model, _ = tiny_vit
    with pytest.raises(ValueError, match="k=10 ranks"):
        lensmat.saturation(model, k=10, progress=False)
    with pytest.raises(ValueError, match="Unknown image dataset 'leipzig-wiki'"):
        lensmat.saturation(model, "leipzig-wiki", progress=False)


def test_other_image_and_speech_models_are_refused_naming_what_is_read(tmp_path):
    from transformers import ViTConfig, ViTModel

    for kind, config in (("vision", {"model_type": "deit", "architectures": ["DeiTForImageClassification"],
                                     "image_size": 224, "num_channels": 3}),
                         ("speech", {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"], "conv_dim": [512]}),
                         ("multimodal", {"model_type": "clip", "vision_config": {}, "text_config": {}})):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=f"holds a {kind} model .*lensmat reads text models .*ViT image classifiers"):
            lensmat.load_model(str(folder), device="cpu")
    bare = tmp_path / "bare_vit"  # a ViT without its classifier head has no classes to rank
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=8,
                       patch_size=2, num_channels=1)).save_pretrained(bare)
    with pytest.raises(ModelLoadError, match="holds a vision model .*ViTForImageClassification"):
        lensmat.load_model(str(bare), device="cpu")
    assert modality({"model_type": "gpt2"}) == "text"


def test_text_analyses_refuse_an_image_classifier_naming_saturation(tiny_vit):
    model, _ = tiny_vit
    with pytest.raises(ValueError, match="ViT image classifier: lensmat reads it with `lensmat saturation`"):
        lensmat.compare(model, max_eval_tokens=20)
    with pytest.raises(AttributeError, match="ViT image classifier, which has no 'W_E'"):
        _ = model.W_E
    assert getattr(model, "tokenizer", None) is None


def test_a_vision_model_on_several_devices_is_refused(tiny_vit):
    _, folder = tiny_vit
    with pytest.raises(ModelLoadError, match="one device"):
        lensmat.load_model(str(folder), device_map="auto")


def test_random_init_of_a_vit_folder_is_seeded(tiny_vit):
    model, folder = tiny_vit
    a = lensmat.load_model(str(folder), device="cpu", random_init=3)
    b = lensmat.load_model(str(folder), device="cpu", random_init=3)
    assert torch.equal(a.W_U, b.W_U) and not torch.equal(a.W_U, model.W_U)
    assert "random init, seed 3" in a.cfg.model_name


def test_vit_base_random_is_google_vit_base_with_seeded_weights():
    from transformers import ViTConfig

    config = ViTConfig(**VIT_BASE_CONFIG)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.image_size, config.patch_size, config.num_labels, config.layer_norm_eps) == (
        768, 12, 12, 3072, 224, 16, 1000, 1e-12)


def test_the_image_split_is_fixed_and_disjoint():
    train, heldout = load_images("digits", "train"), load_images("digits", "heldout")
    assert (len(train), len(heldout)) == (1257, 540)
    assert not set(train.index.tolist()) & set(heldout.index.tolist())
    assert torch.equal(load_images("digits", "heldout").index, heldout.index)
    assert heldout.images.shape == (540, 1, 8, 8) and float(heldout.images.max()) <= 1.0
    assert len(load_images("digits", "all")) == 1797
    with pytest.raises(ValueError, match="Unknown image dataset"):
        load_images("cifar10")


@pytest.mark.slow
def test_the_bundled_vit_digits_keeps_its_recorded_accuracy():
    from lensmat.models.vision import vit_digits_path

    model = lensmat.load_model("vit-digits", device="cpu")
    summary = json.loads((vit_digits_path() / "training_summary.json").read_text())
    heldout = load_images("digits", "heldout")
    with torch.no_grad():
        pred = model(model.pixel_values(heldout.images)).argmax(-1)
    n_correct = int((pred == heldout.labels).sum())
    assert n_correct == summary["heldout_correct"] and len(heldout) == summary["n_heldout"]
    assert summary["heldout_accuracy"] > 0.9
    assert sum(p.numel() for p in model.hf_model.parameters()) == summary["parameters"]


@pytest.mark.slow
def test_saturation_on_the_bundled_vit_digits_is_sane(tmp_path, capsys):
    assert cli.main(["saturation", "--model", "vit-digits", "--out", str(tmp_path / "run"), "--quiet",
                     "--permutations", "200", "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "images (CLS token)" in printed and "implant intervention: not run" in printed
    report = strict_json(tmp_path / "run" / "report.json")
    n_layers = report["n_layers"]
    assert (report["modality"], report["n_images"], report["k"], n_layers) == ("vision", 540, 5, 8)
    assert report["heldout_accuracy"] > 0.9
    assert report["n_kept"] > 270  # most images' top-1 settles by block output floor(0.85·L)
    means = report["mean_layer"]
    assert all(1 <= m <= n_layers for m in means)
    assert means[0] < means[-1]  # rank 1 settles before rank 5 on average
    assert report["kendall_tau"] is not None and -1 <= report["kendall_tau"] <= 1
    assert report["ci_low"]["mean_layer"][0] <= means[0] <= report["ci_high"]["mean_layer"][0]
    assert report["bootstrap"]["n_documents"] == report["n_kept"]
