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
    """Ragged random token sequences (BOS = 0 first) grouped into padded batches."""
    from lensmat.data import pad

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        seqs = []
        for _ in range(batch_size):
            n = int(torch.randint(2, max_len + 1, (1,), generator=g))
            seqs.append([0] + torch.randint(1, d_vocab, (n - 1,), generator=g).tolist())
        out.append(pad(seqs))
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A random 3-block Hugging Face GPT-2 with a 49-word vocabulary (``w0``..``w47``, BOS 48),
    saved as a local folder and loaded through :func:`lensmat.load_model`, plus a local corpus of
    ``w`` words whose next word is mostly predictable (:func:`word_corpus`). Returns ``(model, folder, corpus path)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    import lensmat

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = {f"w{i}": i for i in range(48)} | {"<|endoftext|>": 48}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="w0").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=49, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=48,
                     eos_token_id=48, initializer_range=0.2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    corpus = word_corpus(folder / "corpus.txt")
    return lensmat.load_model(str(folder), device="cpu"), folder, corpus


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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    import lensmat

    folder = tmp_path_factory.mktemp("tiny_bert")
    specials = ["[CLS]", "[SEP]", "[MASK]", "[PAD]"]
    vocab = {f"w{i}": i for i in range(48)} | {s: 48 + i for i, s in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                            pad_token="[PAD]", unk_token="w0").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
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
