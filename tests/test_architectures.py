"""The architecture matrix (issue 17, first part): a tiny seeded random model of every Hugging Face
family TransformerBridge 4.3 supports, built offline from a config (2 blocks, width 32, a word-level
tokenizer), loaded through ``lensmat.load_model(folder)``: the bridge's logits equal HF's, and
``compare`` reads every layer, exactly at ``L``, with no NaN. A family the bridge cannot load is
listed in ``UNSUPPORTED`` with the reason, and the test fails if that changes."""

import math

import pytest
import torch

import lensmat
from conftest import save_word_tokenizer, word_corpus

W = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
GQA = dict(W, num_key_value_heads=2)
FAMILIES = {  # family: (config class, model class, config arguments)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=32, num_layers=2, num_heads=4, window_size=8,
                                                           attention_types=[[["global", "local"], 1]],
                                                           max_position_embeddings=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", W),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, word_embed_proj_dim=32)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", GQA),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(GQA, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(GQA, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GQA, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(GQA, head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", W),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", GQA),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", GQA),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", W),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", W),
    "bert": ("BertConfig", "BertForMaskedLM", dict(W, type_vocab_size=1)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(W, type_vocab_size=1, max_position_embeddings=128)),
}
UNSUPPORTED = {  # family: (config class, model class, config arguments, what the bridge says)
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
                   "Could not determine supported architecture"),
}
MASKED = {"bert", "roberta", "distilbert"}
BLOCK_HOOKS = ("hook_resid_mid", "ln1.hook_normalized", "ln1.hook_out", "ln2.hook_normalized", "ln2.hook_out",
               "hook_attn_out", "hook_mlp_out")
NO_HOOKS = {  # block hooks a family lacks, and why (the README's support table)
    "gpt_neox": ("hook_resid_mid",),  # parallel attention and MLP
    "gptj": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),  # parallel, one norm per block
    "phi": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),
    "falcon": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),
    "olmo2": ("ln1.hook_normalized", "ln1.hook_out", "ln2.hook_normalized", "ln2.hook_out"),  # norms after attn/MLP
}


def build(folder, family, spec):
    """Save a seeded random model of ``family`` with the word tokenizer to ``folder``; returns the HF model."""
    import transformers

    config_cls, model_cls, kwargs = spec[:3]
    masked = family in MASKED
    vocab = save_word_tokenizer(folder, masked=masked)
    ids = dict(pad_token_id=51) if masked else dict(bos_token_id=48, eos_token_id=48, pad_token_id=None)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=vocab, **ids, **kwargs)).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_matches_hf_and_compare_is_exact_at_L(family, tmp_path):
    hf = build(tmp_path, family, FAMILIES[family])
    model = lensmat.load_model(str(tmp_path), device="cpu")
    L = int(model.cfg.n_layers)
    assert L == 2
    masked = family in MASKED
    assert lensmat.is_masked_lm(model) == masked
    ids = torch.tensor([[48, 5, 9, 3, 17, 8, 2, 11, 30, 7] + ([49] if masked else [])])
    with torch.no_grad():
        expected = hf(ids).logits
        if masked:  # the bridge's last residual layer through lensmat's masked-LM readout
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n == lensmat.resid_hook(L))
            got = lensmat.LogitLens(model)(cache[lensmat.resid_hook(L)], L)
        else:
            got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    missing = tuple(h for h in BLOCK_HOOKS if f"blocks.0.{h}" not in model.hook_dict)
    assert missing == NO_HOOKS.get(family, ()), missing
    corpus = word_corpus(tmp_path / "corpus.txt", n_lines=60)
    report = lensmat.compare(model, str(corpus), lenses="logit,mat", max_fit_tokens=600, max_eval_tokens=200,
                             max_length=24, progress=False)
    for name in ("logit", "mat"):
        scores = report["lenses"][name]
        assert scores["precision@1"][L] == 1.0 and scores["kl"][L] == pytest.approx(0.0, abs=1e-5)
        for metric in ("precision@1", "kl", "surprisal"):
            assert all(v is not None and math.isfinite(v) for v in scores[metric]), (name, metric, scores[metric])


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_families_the_bridge_cannot_load_are_refused_with_the_reason(family, tmp_path):
    build(tmp_path, family, UNSUPPORTED[family])
    with pytest.raises(Exception, match=UNSUPPORTED[family][3]):
        lensmat.load_model(str(tmp_path), device="cpu")
