"""The architecture matrix (issue 17): a tiny seeded random model of every Hugging Face family
TransformerBridge 4.3 supports, built offline from a config (2 blocks, width 32, a word-level
tokenizer), loaded through ``lensmat.load_model(folder)``. Per family: the bridge's logits equal
HF's; every sub-module kind's hook pair is the module (its output is a function of its input
alone, and the model reads it); ``compare``, ``submodules``, ``linearity``, ``saturation`` and
``early-exit`` run with tiny budgets, exactly at ``L`` and with no NaN; the real early-exit loop
decodes like the full model (causal families). A family the bridge cannot load is listed in
``UNSUPPORTED`` with the reason, and the test fails if that changes. The support table of
``docs/architectures.md`` is :func:`support_table`, checked here, so it always states what this matrix verified
(``python tests/test_architectures.py`` prints it)."""

import math
import sys
from pathlib import Path

import pytest
import torch

import lensmat
from lensmat.reports import early_exit
from lensmat.analyses.generation import generate, greedy_reference
from lensmat.reports import linearity
from lensmat.reports import saturation
from lensmat.analyses.submodules import one_token_attention_swap
from lensmat.reports import submodules
from lensmat.analyses.swap import block_layout, model_kinds, submodule_pair

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_word_tokenizer, word_corpus  # noqa: E402

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
NO_HOOKS = {  # block hooks a family lacks, and why (the support table of docs/architectures.md)
    "gpt_neox": ("hook_resid_mid",),  # parallel attention and MLP
    "gptj": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),  # parallel, one norm per block
    "phi": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),
    "falcon": ("hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out"),
    "olmo2": ("ln1.hook_normalized", "ln1.hook_out", "ln2.hook_normalized", "ln2.hook_out"),  # norms after attn/MLP
}


LAYOUT = {"gpt_neox": "parallel", "gptj": "parallel-one-norm", "phi": "parallel-one-norm", "falcon": "parallel-one-norm",
          "gemma2": "sandwich", "gemma3_text": "sandwich", "bert": "post-norm", "roberta": "post-norm",
          "olmo2": "post-sublayer-norm"}  # else pre-norm
COMMANDS = ("compare", "submodules", "linearity", "saturation", "early-exit")
NAMES = {"gpt2": "GPT-2", "gpt_neo": "GPT-Neo", "gpt_neox": "GPT-NeoX / Pythia", "gptj": "GPT-J", "opt": "OPT",
         "bloom": "BLOOM", "llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral (MoE)", "qwen2": "Qwen2",
         "qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi": "Phi",
         "phi3": "Phi-3", "stablelm": "StableLM", "falcon": "Falcon", "olmo": "OLMo", "olmo2": "OLMo 2",
         "bert": "BERT (masked)", "roberta": "RoBERTa (masked)", "distilbert": "DistilBERT (masked)"}


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


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(family)`` -> ``(bridge, HF model, corpus path)``, built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            hf = build(folder, family, FAMILIES[family])
            cache[family] = (lensmat.load_model(str(folder), device="cpu"), hf, word_corpus(folder / "corpus.txt", 80))
        return cache[family]

    return get


def finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_and_matches_hf(family, zoo):
    model, hf, _ = zoo(family)
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
    assert block_layout(model) == LAYOUT.get(family, "pre-norm")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_submodule_pair_is_the_module(family, zoo):
    """Two texts A and B: patching the input hook of block 1 with A's value while running B gives
    A's value at the output hook (the output depends on the input alone), B's output differs from
    A's (the patch did something), the output is not the input itself, and patching the output hook
    changes the logits (the model reads it). A kind the family lacks is refused, naming the kinds it has."""
    model, _, _ = zoo(family)
    a = torch.tensor([[48, 5, 9, 3, 17, 8, 2, 11, 30, 7]])
    b = torch.tensor([[48, 12, 4, 22, 6, 19, 1, 13, 25, 40]])
    pairs = {kind: submodule_pair(model, kind, 1) for kind in model_kinds(model)}
    hooks = {h for pair in pairs.values() for h in pair}
    with torch.no_grad():
        logits_b, cache_b = model.run_with_cache(b, names_filter=lambda n: n in hooks)
        _, cache_a = model.run_with_cache(a, names_filter=lambda n: n in hooks)
        for kind, (src, tgt) in pairs.items():
            assert not torch.allclose(cache_a[src], cache_a[tgt], atol=1e-4), f"{kind}: {tgt} is its input {src}"
            seen = {}
            model.run_with_hooks(b, fwd_hooks=[(src, lambda x, hook, v=cache_a[src]: v),
                                               (tgt, lambda x, hook, seen=seen: seen.setdefault("y", x.clone()))])
            torch.testing.assert_close(seen["y"], cache_a[tgt], atol=1e-5, rtol=1e-4, msg=f"{kind}: {src} -> {tgt}")
            assert not torch.allclose(cache_b[tgt], cache_a[tgt], atol=1e-4), kind
            patched = model.run_with_hooks(b, fwd_hooks=[(tgt, lambda x, hook, v=cache_a[tgt]: v)])
            assert not torch.allclose(patched, logits_b, atol=1e-4), f"{kind}: the model does not read {tgt}"
    for kind in sorted({"ln1", "attn", "ln2", "mlp", "block"} - set(model_kinds(model))):
        with pytest.raises(ValueError, match=f"no {kind} sub-module.*Its kinds: {', '.join(model_kinds(model))}"):
            submodule_pair(model, kind, 0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_swapping_attention_for_its_exact_map_changes_nothing(family, zoo):
    """On one-token inputs attention is affine in its input, so the affine attn maps fitted there
    reproduce it: swapped into every block, the logits are unchanged."""
    model, _, _ = zoo(family)
    plain, swapped = one_token_attention_swap(model, range(48))
    torch.testing.assert_close(swapped, plain, atol=2e-4, rtol=1e-3)


def run_command(command: str, model, corpus) -> dict:
    """``command`` on ``model`` with tiny budgets; checks what must hold at layer ``L`` and that no
    reported number is NaN; returns the report."""
    L, tiny = int(model.cfg.n_layers), dict(max_length=24, progress=False)
    if command == "compare":
        r = lensmat.compare(model, str(corpus), lenses="logit,mat", max_fit_tokens=600, max_eval_tokens=200, **tiny)
        for scores in r["lenses"].values():
            assert scores["precision@1"][L] == 1.0 and scores["kl"][L] == pytest.approx(0.0, abs=1e-5)
            assert all(finite(scores[m]) for m in ("precision@1", "kl", "surprisal"))
    elif command == "submodules":
        r = submodules(model, str(corpus), max_fit_tokens=600, max_eval_tokens=100, **tiny)
        for name, scores in r["variants"].items():
            assert scores["precision@1"][L] == 1.0, name
            assert finite(scores["precision@1"]) and finite(scores["surprisal"]), name
        assert all(finite(s["precision@1"]) for s in r["single_block"].values())
    elif command == "linearity":
        r = linearity(model, str(corpus), max_fit_tokens=600, max_eval_tokens=100, **tiny)
        assert all(rows[0]["precision@1"] == 1.0 for rows in r["pruning"].values())
        assert finite(r["linearity"]) and finite(r["linearity_no_residual"]) and finite(r["cosine"])
    elif command == "saturation":
        r = saturation(model, str(corpus), k=3, max_fit_tokens=600, max_eval_tokens=300, n_permutations=50,
                       max_pairs=10, **tiny)
        assert r["n_tokens"] > 0 and finite(r["mean_layer"])
    else:
        r = early_exit(model, str(corpus), max_fit_tokens=600, max_eval_tokens=200, max_probe_tokens=300, **tiny)
        for lens, curve in r["curves"].items():
            never = max(curve, key=lambda p: p["lambda"])
            assert never["mean_layers"] == L and never["precision@1"] == 1.0, lens
            assert r["fixed_exit"][lens][-1]["precision@1"] == 1.0, lens
            assert all(math.isfinite(p["precision@1"]) for p in curve)
    return r


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_command_runs_on_every_family(family, command, zoo):
    model, _, corpus = zoo(family)
    run_command(command, model, corpus)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - MASKED))
def test_real_early_exit_loop_decodes_like_the_full_model(family, zoo):
    """With a KV cache: no exit is the full model's greedy decoding (recomputed without a cache);
    exiting after block 1 at every step keeps every layer's cache complete."""
    model, _, _ = zoo(family)
    prompt = [48, 3, 6, 9, 12]
    assert generate(model, None, prompt, 6)["tokens"] == greedy_reference(model, prompt, 6)
    out = generate(model, lensmat.LogitLens(model), prompt, 6, lam=-1.0)
    assert out["exit_layers"] == [2] + [1] * 5
    assert out["kv_lengths"] == [len(prompt) + 5] * 2


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_families_the_bridge_cannot_load_are_refused_with_the_reason(family, tmp_path):
    build(tmp_path, family, UNSUPPORTED[family])
    with pytest.raises(Exception, match=UNSUPPORTED[family][3]):
        lensmat.load_model(str(tmp_path), device="cpu")


KIND_NOTE = {"pre-norm": "ln1 attn ln2 mlp", "parallel": "ln1 attn ln2 mlp (parallel)",
             "parallel-one-norm": "ln1 attn mlp (parallel, one norm)",
             "sandwich": "ln1 attn ln2 mlp (output norms kept)",
             "post-norm": "ln1 attn ln2 mlp (post-norm)", "post-sublayer-norm": "ln1 attn ln2 mlp (ln = output norms)"}


def support_table() -> str:
    """The family × command table of docs/architectures.md, from this matrix's expectations (each cell is a test above)."""
    cols = ["loads, logits = HF", "sub-module kinds", *COMMANDS, "real early-exit loop"]
    lines = ["| family | " + " | ".join(f"`{c}`" if c in COMMANDS else c for c in cols) + " |",
             "|" + " --- |" * (len(cols) + 1)]
    for family in sorted(FAMILIES, key=lambda f: (f in MASKED, NAMES[f])):
        cells = ["yes", KIND_NOTE[LAYOUT.get(family, "pre-norm")], *(["yes"] * len(COMMANDS)), "no: encoder" if family in MASKED else "yes"]
        lines.append(f"| {NAMES[family]} | " + " | ".join(cells) + " |")
    for family, spec in sorted(UNSUPPORTED.items()):
        lines.append(f"| {NAMES[family]} | no: \"{spec[3]}\" |" + " — |" * (len(cols) - 1))
    return "\n".join(lines)


def test_docs_support_table_is_this_matrix():
    page = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    assert support_table() in page, "docs/architectures.md's support table is stale: paste `python tests/test_architectures.py`"


if __name__ == "__main__":
    print(support_table())
