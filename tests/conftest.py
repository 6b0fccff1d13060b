"""Shared fixtures: tiny random bridges (fast) and the bundled reference model (slow tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def make_tiny_model(n_layers: int = 3, d_model: int = 16, d_vocab: int = 40, n_ctx: int = 32, seed: int = 0):
    """A random TL-native bridge (LayerNorm, GELU MLP), eval mode, float32."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=d_model, n_layers=n_layers, n_ctx=n_ctx, d_head=4, n_heads=d_model // 4,
        d_mlp=4 * d_model, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", seed=seed,
    )
    model = TransformerBridge.boot_native(cfg)
    model.cfg.model_name = f"tiny-{n_layers}x{d_model}-seed{seed}"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def reference_model():
    import lensmat

    return lensmat.load_model(device="cpu")


@pytest.fixture(scope="session")
def reference_tokenizer():
    from transformers import AutoTokenizer

    from lensmat.models import reference_model_path

    return AutoTokenizer.from_pretrained(reference_model_path())


def random_token_batches(n_batches: int, batch_size: int, max_len: int, d_vocab: int, seed: int = 0):
    """Ragged random token sequences (BOS = 0 first) grouped into padded batches, each row its own document."""
    from lensmat.data import numbered, pad

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        seqs = []
        for _ in range(batch_size):
            n = int(torch.randint(2, max_len + 1, (1,), generator=g))
            seqs.append([0] + torch.randint(1, d_vocab, (n - 1,), generator=g).tolist())
        out.append(pad(seqs))
    return list(numbered(out))


def save_word_tokenizer(folder, masked: bool = False) -> int:
    """A word-level tokenizer over ``w0``..``w47`` saved to ``folder``; returns its vocabulary size.
    Causal: ``<|endoftext|>`` = 48 is BOS and EOS. Masked: ``[CLS] [SEP] [MASK] [PAD]`` = 48..51."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[CLS]", "[SEP]", "[MASK]", "[PAD]"] if masked else ["<|endoftext|>"]
    vocab = {f"w{i}": i for i in range(48)} | {s: 48 + i for i, s in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    names = (dict(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]") if masked
             else dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", **names).save_pretrained(folder)
    return len(vocab)


def save_tiny_causal_lm(folder, family: str = "gpt2"):
    """A random 3-block Hugging Face causal LM of ``family`` (``gpt2``, ``gpt_neox``, ``opt``,
    ``llama``, ``gemma3``) over a
    49-word vocabulary (``w0``..``w47``, BOS/EOS 48), saved to ``folder`` with its tokenizer.
    ``gemma3`` has a 6-position sliding window on its first two layers (the third is global), so
    lines longer than 6 tokens exercise the sliding-window cache."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM)

    save_word_tokenizer(folder)
    torch.manual_seed(0)
    # Gemma scales its embeddings by sqrt(d_model): with 0.2 the embedding swamps the stream and the
    # random model repeats one token; its default 0.02 gives varied greedy continuations.
    common = dict(vocab_size=49, bos_token_id=48, eos_token_id=48, initializer_range=0.02 if family == "gemma3" else 0.2)
    if family == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=3, n_head=4, **common))
    elif family == "gpt_neox":  # parallel attention and MLP, partial rotary
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, max_position_embeddings=64, **common))
    elif family == "opt":  # learned positions offset by 2, ReLU MLP
        hf = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=None, **common))
    elif family == "llama":
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          pad_token_id=None, **common))
    elif family == "gemma3":
        hf = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                max_position_embeddings=64, sliding_window=6,
                                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                                pad_token_id=None, **common))
    else:
        raise ValueError(family)
    for module in hf.modules():  # random RMSNorm gains, as after training (Gemma stores them as 1 + w)
        if family in ("llama", "gemma3") and "RMSNorm" in type(module).__name__:
            torch.nn.init.normal_(module.weight, 1.0 if family == "llama" else 0.0, 0.3)
    hf.eval().save_pretrained(folder)
    return folder


def _tiny_causal(tmp_path_factory, family):
    import lensmat

    folder = save_tiny_causal_lm(tmp_path_factory.mktemp(f"tiny_{family}"), family)
    corpus = word_corpus(folder / "corpus.txt")
    return lensmat.load_model(str(folder), device="cpu"), folder, corpus


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A random 3-block Hugging Face GPT-2 (:func:`save_tiny_causal_lm`) loaded through
    :func:`lensmat.load_model`, plus a local corpus of ``w`` words whose next word is mostly
    predictable (:func:`word_corpus`). Returns ``(model, folder, corpus path)``."""
    return _tiny_causal(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_gpt_neox(tmp_path_factory):
    """As :func:`tiny_gpt2`, a random 3-block GPT-NeoX (Pythia's layout: parallel attention and MLP)."""
    return _tiny_causal(tmp_path_factory, "gpt_neox")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """As :func:`tiny_gpt2`, a random 3-block OPT."""
    return _tiny_causal(tmp_path_factory, "opt")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """As :func:`tiny_gpt2`, a random 3-block Llama (RMSNorm, rotary, grouped-query attention)."""
    return _tiny_causal(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """As :func:`tiny_gpt2`, a random 3-block Gemma-3 text model (sliding window 6 on blocks 0-1)."""
    return _tiny_causal(tmp_path_factory, "gemma3")


def word_corpus(path, n_lines: int = 120, seed: int = 1):
    """Lines of ``w`` words (``w{s} w{s+3} w{s+6} ...`` mod 48), so a word is mostly predictable
    from its neighbours; written to ``path`` (one line per document)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        start = int(torch.randint(0, 48, (1,), generator=g))
        n = int(torch.randint(4, 20, (1,), generator=g))
        lines.append(" ".join(f"w{(start + 3 * i) % 48}" for i in range(n)))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random 3-block Hugging Face ``BertForMaskedLM`` over ``w0``..``w47`` plus ``[CLS]``
    ``[SEP]`` ``[MASK]`` ``[PAD]``, saved as a local folder and loaded through
    :func:`lensmat.load_model`, with a ``w``-word corpus. Returns ``(model, folder, corpus path)``."""
    from transformers import BertConfig, BertForMaskedLM

    import lensmat

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab_size = save_word_tokenizer(folder, masked=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=1, pad_token_id=51,
                     initializer_range=0.2)
    hf = BertForMaskedLM(cfg).eval()
    for module in hf.modules():  # random LayerNorm gains and biases, as after training (else h_l sums to 0)
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    hf.save_pretrained(folder)
    corpus = word_corpus(folder / "corpus.txt")
    return lensmat.load_model(str(folder), device="cpu"), folder, corpus


def write_tiny_llama_gguf(path, seed: int = 0, quant: str = "Q8_0", architecture: str = "llama"):
    """A random 2-block Llama (d_model 32, 64 tokens ``<s> </s> <unk> w0..w60``) as a GGUF file, its
    matrices quantized to ``quant`` (norms stay F32), as llama.cpp lays one out."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    g = np.random.default_rng(seed)
    V, d, f, L, H, KV = 64, 32, 64, 2, 4, 2
    w = GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(f)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // H)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 3)])
    w.add_token_types([3, 3, 2] + [1] * (V - 3))
    w.add_token_scores([0.0] * V)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    qtype = getattr(GGMLQuantizationType, quant)

    def tensor(name, shape, scale=0.2, quantized=True):
        a = (g.standard_normal(shape) * scale).astype(np.float32)
        if quantized and quant != "F32":
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (V, d), 1.0)
    for i in range(L):
        tensor(f"blk.{i}.attn_norm.weight", (d,), 0.3, quantized=False)
        tensor(f"blk.{i}.attn_q.weight", (d, d))
        tensor(f"blk.{i}.attn_k.weight", (KV * d // H, d))
        tensor(f"blk.{i}.attn_v.weight", (KV * d // H, d))
        tensor(f"blk.{i}.attn_output.weight", (d, d))
        tensor(f"blk.{i}.ffn_norm.weight", (d,), 0.3, quantized=False)
        tensor(f"blk.{i}.ffn_gate.weight", (f, d))
        tensor(f"blk.{i}.ffn_up.weight", (f, d))
        tensor(f"blk.{i}.ffn_down.weight", (d, f))
    tensor("output_norm.weight", (d,), 0.3, quantized=False)
    tensor("output.weight", (V, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def require_named_model(name: str):
    """The GGUF file of a named offline model (``smollm2-135m``, ``gemma3-270m``). In CI (``CI`` set) a
    missing package is a failure; elsewhere the test is skipped with the ``pip`` line that installs it."""
    from lensmat.models.gguf import GGUFError, named_gguf

    try:
        return named_gguf(name)
    except GGUFError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def load_named_model(name: str):
    """A named offline model through :func:`lensmat.load_model` (see :func:`require_named_model`)."""
    import lensmat

    require_named_model(name)
    return lensmat.load_model(name, device="cpu")


def hf_twin(name: str):
    """The dequantized weights of a named offline model as a plain Hugging Face model (no bridge)."""
    from transformers import AutoModelForCausalLM

    from lensmat.models.gguf import gguf_folder

    return AutoModelForCausalLM.from_pretrained(gguf_folder(require_named_model(name))).eval()


def strict_json(path):
    """``path`` parsed as strict JSON: NaN and Infinity are refused."""
    import json

    def refuse(token):
        raise ValueError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_real_attention_swap(model, n_tokens: int = 1024) -> None:
    """On ``n_tokens`` random one-token inputs of a real model, the one-token attention swap
    (:func:`lensmat.analyses.submodules.one_token_attention_swap`) moves no logit by 1e-4 of the largest and
    keeps every top-1."""
    from lensmat.analyses.submodules import one_token_attention_swap

    g = torch.Generator().manual_seed(0)
    plain, swapped = one_token_attention_swap(model, torch.randperm(int(model.cfg.d_vocab), generator=g)[:n_tokens].tolist())
    assert float((swapped - plain).abs().max() / plain.abs().max()) < 1e-4
    assert bool((swapped.argmax(-1) == plain.argmax(-1)).all())

