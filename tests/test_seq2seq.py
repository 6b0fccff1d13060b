"""Encoder-decoder models (Whisper- and T5-style) read through their decoder: hooks, readout, the mat lens's
fit, the saturation protocol end to end, refusals (fast, tiny random models); the bundled trained models'
recorded held-out accuracy and saturation (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import lensmat
from lensmat.data import seq2seq as data_seq2seq
from lensmat.data.seq2seq import number_words, seq2seq_examples
from lensmat.models import ModelLoadError
from lensmat.models.seq2seq import Seq2SeqModel

TINY_FEATURES = dict(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400, padding_value=0.0)


def tiny_whisper(tie: bool = True, seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=len(data_seq2seq.speech_vocab()), num_mel_bins=16, encoder_layers=2,
                           decoder_layers=3, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50, max_target_positions=24,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1,
                           begin_suppress_tokens=None, suppress_tokens=None, init_std=0.2)
    return WhisperForConditionalGeneration(config).eval()


def tiny_t5(tie: bool = True, seed: int = 0, vocab_size: int = 44):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=tie,
                      initializer_factor=3.0)
    model = T5ForConditionalGeneration(config).eval()
    for module in model.modules():  # random RMSNorm gains, as after training
        if "LayerNorm" in type(module).__name__:
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
    return model


def _inputs(model: Seq2SeqModel, b: int = 3, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randint(0, model.cfg.d_vocab, (b, t), generator=g)
    if model.family == "whisper":
        return torch.randn(b, model.cfg.num_mel_bins, model.cfg.n_frames, generator=g), dec, None
    enc = torch.randint(2, model.cfg.d_vocab, (b, 9), generator=g)
    mask = torch.ones_like(enc)
    mask[1, 5:] = 0  # a padded encoder row
    return enc, dec, mask


def _hf_outputs(model: Seq2SeqModel, enc, dec, mask):
    kwargs = {"input_features": enc} if model.family == "whisper" else {"input_ids": enc, "attention_mask": mask}
    return model.hf_model(**kwargs, decoder_input_ids=dec, output_hidden_states=True, use_cache=False)


@pytest.fixture(params=["whisper", "t5"])
def tiny(request):
    hf = tiny_whisper() if request.param == "whisper" else tiny_t5()
    return Seq2SeqModel(hf, f"tiny-{request.param}")


@torch.no_grad()
def test_hooks_equal_hf_decoder_hidden_states(tiny):
    enc, dec, mask = _inputs(tiny)
    _, cache = tiny.run_with_cache(enc, dec, mask)
    hs = _hf_outputs(tiny, enc, dec, mask).decoder_hidden_states
    names = tiny.resid_names()
    assert len(hs) == len(names) == tiny.cfg.n_layers + 1
    for layer in range(tiny.cfg.n_layers):  # h_l = HF's decoder_hidden_states[l] for l < L
        torch.testing.assert_close(cache[names[layer]], hs[layer], rtol=0, atol=0)
    for layer in range(1, tiny.cfg.n_layers):  # a block's input is the previous block's output
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer - 1}.hook_resid_post"])
    # HF's last entry is after the decoder's final norm; lensmat's h_L is before it
    torch.testing.assert_close(tiny.final_norm(cache[names[-1]]), hs[-1], rtol=0, atol=1e-6)
    assert not torch.allclose(cache[names[-1]], hs[-1])


@torch.no_grad()
def test_lens_at_last_layer_is_the_models_logits(tiny):
    from lensmat.lenses import engine

    enc, dec, mask = _inputs(tiny)
    logits, cache = tiny.run_with_cache(enc, dec, mask)
    h_last = cache[tiny.resid_names()[-1]]
    torch.testing.assert_close(tiny.readout(h_last), logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(_hf_outputs(tiny, enc, dec, mask).logits, logits, rtol=0, atol=1e-5)
    read = engine.read(tiny.unembedding(), h_last.reshape(1, -1, tiny.cfg.d_model), k=5)  # the readout engine
    assert torch.equal(read.top_ids[0], logits.reshape(-1, tiny.cfg.d_vocab).topk(5).indices)


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_t5_rescales_tied_outputs_only(tie):
    model = Seq2SeqModel(tiny_t5(tie=tie), "tiny-t5")
    assert model.output_scale == (32 ** -0.5 if tie else 1.0)
    enc, dec, mask = _inputs(model)
    logits, cache = model.run_with_cache(enc, dec, mask)
    torch.testing.assert_close(model.readout(cache[model.resid_names()[-1]]), logits, rtol=0, atol=1e-5)


def test_mat_map_of_a_layer_to_itself_is_the_identity_and_fits_as_lstsq(tmp_path):
    from lensmat.analyses.saturation_seq2seq import decoder_states, fit_decoder_maps
    from lensmat.stats.collect import resid_hooks
    from lensmat.stats.fit import fit_map
    from lensmat.stats.gram import GramStats

    model = _t5_folder_model(tmp_path)
    train = seq2seq_examples(model, "train", max_positions=600)
    resid = torch.cat([r for r, _, _ in decoder_states(model, train, batch_size=32)], 1).double()  # [L+1, n, d]
    hooks = tuple(resid_hooks(model.cfg.n_layers))
    stats = GramStats(hooks, (model.cfg.d_model,) * len(hooks))
    stats.update(resid.permute(1, 0, 2).reshape(resid.shape[1], -1))
    identity = fit_map(stats, hooks[-1], hooks[-1])
    torch.testing.assert_close(identity.W, torch.eye(model.cfg.d_model), rtol=0, atol=1e-4)
    maps, n = fit_decoder_maps(model, train, batch_size=32)
    assert n == resid.shape[1] == train.n_positions
    assert set(maps) == {(h, hooks[-1]) for h in hooks[:-1]}
    for layer in (0, 1, model.cfg.n_layers - 1):
        want = torch.linalg.lstsq(resid[layer], resid[-1]).solution
        torch.testing.assert_close(maps[(hooks[layer], hooks[-1])].W.double(), want, rtol=0, atol=2e-3)


def _t5_folder_model(tmp_path, seed: int = 0):
    folder = tmp_path / "tiny_t5"
    tiny_t5(seed=seed, vocab_size=64).save_pretrained(folder)
    return lensmat.load_model(str(folder), device="cpu")


@pytest.fixture()
def tones(monkeypatch):
    """espeak-ng replaced by tones (a chord per word, 0.2 s each): the speech path runs without it."""
    calls = []

    def speak(text, voice="en-us", rate=175, pitch=50, sampling_rate=16000):
        calls.append(text)
        t = np.arange(int(0.2 * sampling_rate)) / sampling_rate
        words = [data_seq2seq.NUMBER_WORDS.index(w) for w in text.split()]
        return np.concatenate([0.3 * np.sin(2 * np.pi * (200 + 40 * w + pitch) * t) for w in words]).astype(np.float32)

    monkeypatch.setattr(data_seq2seq, "speak", speak)
    monkeypatch.setattr(data_seq2seq, "espeak_version", lambda: "tones (test)")
    return calls


def _whisper_folder(tmp_path):
    """A tiny random Whisper folder that reads spoken numbers (its own task.json, data.json, vocab.json)."""
    folder = tmp_path / "tiny_whisper"
    tiny_whisper().save_pretrained(folder)
    items = [{"number": n, "voice": "en-us", "rate": 175, "pitch": 40 + n % 20} for n in range(1, 60)]
    (folder / "data.json").write_text(json.dumps({"train": items[:40], "heldout": items[40:]}))
    (folder / "vocab.json").write_text(json.dumps({"tokens": data_seq2seq.speech_vocab()}))
    (folder / "task.json").write_text(json.dumps({"task": "speech-numbers", "features": TINY_FEATURES}))
    return folder


def test_saturation_end_to_end_speech(tmp_path, tones):
    model = lensmat.load_model(str(_whisper_folder(tmp_path)), device="cpu")
    assert model.modality == "speech" and model.cfg.n_layers == 3
    report = lensmat.saturation(model, lens="logit", k=4, n_permutations=20, out=tmp_path / "run")
    assert report["modality"] == "speech" and report["architecture"] == "encoder-decoder"
    assert report["protocol"] == "teacher-forced"
    heldout = seq2seq_examples(model, "heldout")
    assert report["n_documents"] == 19 == heldout.description["n_examples"]
    assert report["n_tokens"] == heldout.n_positions == sum(len(number_words(n)) + 1 for n in range(41, 60))
    assert len(report["mean_layer"]) == 4 and all(1 <= v <= 3 for v in report["mean_layer"])
    assert report["intervention_success"] is None and report["intervention_sweep"] is None
    assert report["dataset"]["task"] == "speech-numbers" and report["dataset"]["voices"] == ["en-us"]
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "saturation.png").is_file()
    assert tones and tones[0] == "forty one"  # what was spoken: the held-out numbers in words


def test_saturation_end_to_end_text_both_lenses(tmp_path):
    model = _t5_folder_model(tmp_path)
    for lens in ("logit", "mat"):
        report = lensmat.saturation(model, lens=lens, k=5, max_eval_tokens=400, max_fit_tokens=500, n_permutations=20)
        assert report["lens"] == lens and report["modality"] == "text" and report["n_tokens"] == 400
        assert report["dataset"]["task"] == "random-ids" and report["n_documents"] >= 10
        assert 0 <= report["n_kept"] <= report["n_tokens"]
        assert report["kendall_tau"] is None or -1 <= report["kendall_tau"] <= 1
    assert report["n_fit_tokens"] == 500


def test_saturation_layers_follow_the_lens(tmp_path):
    """The lens's top-k at layer L is the model's own, so s_k ≤ L; the mat lens at layer L is the identity."""
    from lensmat.analyses.saturation_seq2seq import decoder_states, fit_decoder_maps
    from lensmat.stats.collect import resid_hooks

    model = _t5_folder_model(tmp_path)
    data = seq2seq_examples(model, "heldout", max_positions=100)
    maps, _ = fit_decoder_maps(model, seq2seq_examples(model, "train", max_positions=400))
    resid, _, _ = next(decoder_states(model, data))
    hooks = resid_hooks(model.cfg.n_layers)
    assert (hooks[-1], hooks[-1]) not in maps  # a layer's map to itself is the identity, never fitted
    mapped = maps[(hooks[0], hooks[-1])](resid[0])
    assert not torch.allclose(mapped, resid[0])


def test_cli_saturation_on_a_t5_folder(tmp_path, capsys):
    from lensmat.cli import main

    folder = tmp_path / "tiny_t5"
    tiny_t5(vocab_size=64).save_pretrained(folder)
    code = main(["saturation", "--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--max-eval-tokens", "300", "--permutations", "10", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["architecture"] == "encoder-decoder" and report["n_tokens"] == 300


def test_refusals(tmp_path, tones):
    from lensmat.analyses.saturation_seq2seq import saturation_seq2seq

    model = _t5_folder_model(tmp_path)
    with pytest.raises(ValueError, match="not defined for an encoder-decoder.*valid: logit, mat"):
        lensmat.saturation(model, lens="tuned")
    with pytest.raises(ValueError, match="reads its own inputs"):
        lensmat.saturation(model, "leipzig-wiki")
    with pytest.raises(ValueError, match="k=64 ranks"):
        lensmat.saturation(model, k=64)
    with pytest.raises(ValueError, match="encoder-decoder model .*lensmat saturation"):
        lensmat.compare(model)
    with pytest.raises(TypeError, match="encoder-decoder"):
        saturation_seq2seq(object())
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(2, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..63"):
        model(torch.ones(1, 3, dtype=torch.long), torch.full((1, 2), 64))
    with pytest.raises(ValueError, match="Unknown hooks"):
        with model.hooks(["blocks.9.hook_resid_pre"]):
            pass
    whisper = lensmat.load_model(str(_whisper_folder(tmp_path)), device="cpu")
    with pytest.raises(ValueError, match=r"log-mel features \[batch, 16 mel bins, 100 frames\]"):
        whisper(torch.randn(1, 16, 99), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ModelLoadError, match="one device"):
        lensmat.load_model(str(tmp_path / "tiny_t5"), device_map="auto")
    odd = tmp_path / "classifier"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "whisper", "architectures": ["WhisperForAudioClassification"]}))
    with pytest.raises(ModelLoadError, match="without its decoder's LM head"):
        lensmat.load_model(str(odd), device="cpu")


def test_random_twin_of_a_folder_is_seeded(tmp_path):
    model = _t5_folder_model(tmp_path)
    a = lensmat.load_model(str(tmp_path / "tiny_t5"), device="cpu", random_init=3)
    b = lensmat.load_model(str(tmp_path / "tiny_t5"), device="cpu", random_init=3)
    assert torch.equal(a.W_U, b.W_U) and not torch.equal(a.W_U, model.W_U)
    assert "random init, seed 3" in a.cfg.model_name and a.inputs == {"task": "random-ids", "seed": 3}
    assert lensmat.describe(a).name == a.cfg.model_name and lensmat.describe(a).n_layers == 3


def test_missing_espeak_names_the_install_line(monkeypatch):
    monkeypatch.setattr(data_seq2seq.shutil, "which", lambda name: None)
    with pytest.raises(data_seq2seq.EspeakMissing, match="apt-get install -y espeak-ng"):
        data_seq2seq.speak("one")


def test_number_words():
    assert number_words(0) == ["zero"]
    assert number_words(40) == ["forty"]
    assert number_words(307) == "three hundred and seven".split()
    assert number_words(4207) == "four thousand two hundred and seven".split()
    assert number_words(42005) == "forty two thousand and five".split()
    assert number_words(999999) == "nine hundred and ninety nine thousand nine hundred and ninety nine".split()
    with pytest.raises(ValueError):
        number_words(1_000_000)
    assert set(w for n in range(0, 1_000_000, 997) for w in number_words(n)) <= set(data_seq2seq.NUMBER_WORDS)


def test_random_copies_of_real_configs():
    t5 = lensmat.load_model("t5-small-random", device="cpu")
    c = t5.cfg
    assert (c.n_layers, c.n_encoder_layers, c.d_model, c.d_vocab, c.n_heads, c.d_mlp) == (6, 6, 512, 32128, 8, 2048)
    assert t5.hf_model.config.relative_attention_num_buckets == 32 and t5.output_scale == 512 ** -0.5
    assert t5.cfg.model_name == "t5-small-random (seed 0)"
    again = lensmat.load_model("t5-small-random", device="cpu", random_init=0)
    other = lensmat.load_model("t5-small-random", device="cpu", random_init=1)
    assert torch.equal(again.W_U, t5.W_U) and not torch.equal(other.W_U, t5.W_U)
    data = seq2seq_examples(t5, "heldout", max_positions=50)
    assert data.n_positions == 50 and all(e.target[-1] == 1 for e in data.examples[:-1])
    whisper = lensmat.load_model("whisper-tiny-random", device="cpu")
    c = whisper.cfg
    assert (c.n_layers, c.n_encoder_layers, c.d_model, c.d_vocab, c.n_heads, c.num_mel_bins, c.n_frames, c.n_ctx) == \
        (4, 4, 384, 51865, 6, 80, 3000, 448)
    assert whisper.inputs["task"] == "speech-random-ids" and whisper.inputs["features"]["chunk_length"] == 30


# slow: the bundled trained models

def require_espeak():
    """espeak-ng, or a skip with the line that installs it (a failure in CI, as the other checks)."""
    if data_seq2seq.shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            raise AssertionError(f"espeak-ng is missing; {data_seq2seq.INSTALL_ESPEAK}")
        pytest.skip(f"espeak-ng is not installed: {data_seq2seq.INSTALL_ESPEAK}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-numbers", "t5-numbers"])
def test_bundled_model_reproduces_its_recorded_heldout_accuracy(name):
    from lensmat.analyses.saturation_seq2seq import seq2seq_accuracy

    if name == "whisper-numbers":
        require_espeak()
    model = lensmat.load_model(name, device="cpu")
    recorded = json.loads((model.folder / "task.json").read_text())["heldout_accuracy"]
    measured = seq2seq_accuracy(model, seq2seq_examples(model, "heldout"))
    assert measured["n_examples"] == recorded["n_examples"] and measured["n_positions"] == recorded["n_positions"]
    # t5-numbers is deterministic; whisper-numbers re-synthesises its audio (the same espeak-ng gives the same samples)
    tolerance = 0 if name == "t5-numbers" else 0.01
    assert abs(measured["exact_match"] - recorded["exact_match"]) <= tolerance
    assert abs(measured["token_accuracy"] - recorded["token_accuracy"]) <= tolerance
    assert measured["exact_match"] > 0.5  # it learned its task


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-numbers", "t5-numbers"])
def test_saturation_runs_on_the_bundled_models(name):
    if name == "whisper-numbers":
        require_espeak()
    model = lensmat.load_model(name, device="cpu")
    report = lensmat.saturation(model, lens="mat", max_eval_tokens=1000, max_fit_tokens=2000, n_permutations=100)
    assert report["n_tokens"] == 1000 and report["n_kept"] > 0 and report["n_fit_tokens"] == 2000
    assert report["modality"] == ("speech" if name == "whisper-numbers" else "text")
    assert report["kendall_tau"] is not None and report["p_value"] is not None
