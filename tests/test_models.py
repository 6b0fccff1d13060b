import pytest
import torch

import lensmat
from lensmat import data, models
from lensmat.lenses.metrics import next_token_quality


def test_unknown_hub_name_offline_gives_one_clear_error():
    with pytest.raises(models.ModelLoadError, match="local folder"):
        lensmat.load_model("no-such-org/no-such-model-xyz", device="cpu")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        lensmat.load_model(tmp_path, device="cpu")


def test_describe_tiny_model(tiny_model):
    info = models.describe(tiny_model)
    assert (info.n_layers, info.d_model, info.d_vocab, info.basis) == (3, 16, 40, "raw")
    assert info == models.describe(tiny_model)  # hashes are deterministic


def test_device_map_reaches_the_bridge_instead_of_device(tiny_gpt2, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    seen = {}
    real = TransformerBridge.boot_transformers

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    lensmat.load_model(str(tiny_gpt2[1]), device_map="auto")
    assert seen["device_map"] == "auto" and "device" not in seen


def test_a_device_mapped_model_fits_the_same_maps_as_a_plain_one(tiny_gpt2):
    """The split-model path end to end. Only CPU targets exist on a CPU machine (where Hugging Face
    places everything on the CPU without dispatching), so this checks it against the plain load."""
    plain, folder, corpus = tiny_gpt2
    mapped = lensmat.load_model(str(folder), device_map={"": "cpu"})
    fits = [lensmat.fit_maps(m, str(corpus), progress=False, all_pairs=False) for m in (plain, mapped)]
    for key, m in fits[0].maps.items():
        assert torch.equal(m.W, fits[1].maps[key].W), key
    h = torch.randn(5, plain.cfg.d_model)
    assert torch.equal(lensmat.MatLens(mapped, fits[1])(h, 1), lensmat.MatLens(plain, fits[0])(h, 1))


def test_split_placement_errors_name_the_fix(tiny_gpt2):
    _, folder, _ = tiny_gpt2
    with pytest.raises(ValueError, match="either device or device_map"):
        lensmat.load_model(str(folder), device="cpu", device_map="auto")
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="n_devices=64 needs that many CUDA devices"):
            lensmat.load_model(str(folder), n_devices=64)


@pytest.mark.slow
def test_reference_model_matches_hf_logits(reference_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models.reference_model_path(), attn_implementation="eager").eval()
    lines = data.load_lines(split="heldout")[:8]
    batch = data.pad(data.tokenize(lines, reference_model.tokenizer))
    with torch.no_grad():
        ours = reference_model(batch.tokens)
        theirs = hf(batch.tokens).logits
    assert reference_model.training is False
    assert (ours - theirs).abs().max().item() <= 1e-4
    info = models.describe(reference_model)
    assert info.n_layers >= 8 and info.basis == "raw" and info.name == "reference"


@pytest.mark.slow
def test_reference_model_quality_floor(reference_model):
    """The model card's held-out numbers: top-1 >= 0.16 and CE <= 5.2 nats on the last 30% of Leipzig lines."""
    seqs = data.tokenize(data.load_lines(split="heldout"), reference_model.tokenizer, 128)
    result = next_token_quality(reference_model, data.batches(seqs, 64))
    assert result["tokens"] > 50_000
    assert result["top1_accuracy"] >= 0.16, result
    assert result["ce"] <= 5.2, result


def test_random_init_is_the_untrained_twin(reference_model):
    import lensmat
    from lensmat.models import ModelLoadError, ModelMismatchError, check_same_model, describe

    a = lensmat.load_model("reference", device="cpu", random_init=0)
    b = lensmat.load_model("reference", device="cpu", random_init=0)
    c = lensmat.load_model("reference", device="cpu", random_init=1)
    trained, twin = describe(reference_model), describe(a)
    assert (twin.n_layers, twin.d_model, twin.d_vocab, twin.n_ctx) == (trained.n_layers, trained.d_model,
                                                                       trained.d_vocab, trained.n_ctx)
    assert twin.source["random_init"] == 0 and "random init, seed 0" in twin.name
    assert torch.equal(a.W_U, b.W_U) and not torch.equal(a.W_U, c.W_U)  # seeded
    assert not torch.allclose(a.W_U, reference_model.W_U)
    assert a.tokenizer("The river")["input_ids"] == reference_model.tokenizer("The river")["input_ids"]
    with pytest.raises(ModelMismatchError):  # artifacts of the trained model refuse its twin
        check_same_model(trained.to_dict(), a)
    with pytest.raises(ModelLoadError, match="random_init needs a local"):
        lensmat.load_model("no-such-hub-model", random_init=0)
