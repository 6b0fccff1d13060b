"""The patchscope lens (:mod:`lensmat.lenses.patchscope`): against a hand-written patch of the whole prompt, the
logit lens at ``L``, batching, ``compare``'s column and cost, the masked-LM refusal."""

import pytest
import torch

from conftest import make_tiny_model
from lensmat.lenses.base import LogitLens
from lensmat.lenses.patchscope import IDENTITY_PROMPT, PatchscopeLens, prompt_ids

PROMPT_IDS = [0, 5, 5, 9, 9, 12, 12, 7]  # a repeat-style prompt of the tiny native model's vocabulary


def hand_patched(model, ids: torch.Tensor, h: torch.Tensor, layer: int) -> torch.Tensor:
    """``h_L`` at the last position of the whole prompt run once per row of ``h``, with
    ``blocks.{layer}.hook_resid_pre`` overwritten there (nnterp's patch, written out)."""
    n_layers, out = model.cfg.n_layers, {}

    def patch(act, hook):
        act[:, -1] = h
        return act

    def capture(act, hook):
        out["h_L"] = act[:, -1].clone()

    model.run_with_hooks(ids.expand(h.shape[0], -1), fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch),
                                                                 (f"blocks.{n_layers - 1}.hook_resid_post", capture)])
    return out["h_L"]


@pytest.fixture(scope="module")
def native():
    return make_tiny_model(n_layers=3, d_model=16, d_vocab=40, seed=3)


@torch.no_grad()
def test_matches_a_hand_written_patch_on_a_native_model(native):
    lens = PatchscopeLens(native, PROMPT_IDS)
    assert lens.settings["forward"] == "full" and lens.settings["position"] == len(PROMPT_IDS) - 1
    g = torch.Generator().manual_seed(0)
    for layer in range(native.cfg.n_layers):
        h = 3 * torch.randn(4, native.cfg.d_model, generator=g)
        want = hand_patched(native, lens.ids, h, layer)
        torch.testing.assert_close(lens.transform_hidden(h, layer), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lens(h, layer), native.unembed(native.ln_final(want[None]))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_gemma3"])
@torch.no_grad()
def test_the_key_value_cache_forward_matches_the_whole_prompt(family, request):
    """Hugging Face models run the prompt's prefix once into a cache: the same states as the whole prompt
    (Gemma-3: rotary, grouped-query attention, a 6-position sliding window shorter than the prompt)."""
    model = request.getfixturevalue(family)[0]
    lens = PatchscopeLens(model, "w1 w1 w4 w4 w9 w9 w2 w2 w7")
    assert lens.settings["forward"] == "kv-cache" and lens.ids.shape[1] == 10  # BOS + 9 words
    g = torch.Generator().manual_seed(1)
    for layer in range(model.cfg.n_layers):
        h = torch.randn(5, model.cfg.d_model, generator=g)
        torch.testing.assert_close(lens.transform_hidden(h, layer), hand_patched(model, lens.ids, h, layer),
                                   atol=1e-5, rtol=0)


@torch.no_grad()
def test_at_the_last_layer_it_is_the_logit_lens(native):
    lens, h = PatchscopeLens(native, PROMPT_IDS), torch.randn(2, 3, native.cfg.d_model)
    L = native.cfg.n_layers
    assert lens.transform_hidden(h, L) is h and lens.transform_hidden(h, -1) is h
    torch.testing.assert_close(lens(h, L), LogitLens(native)(h, L))
    assert lens.usage["rows"] == 0  # no forward runs at L


@torch.no_grad()
def test_rows_batched_and_chunked_equal_one_row_at_a_time(native):
    one_chunk = PatchscopeLens(native, PROMPT_IDS)
    chunked = PatchscopeLens(native, PROMPT_IDS, chunk_positions=3 * len(PROMPT_IDS))  # 3 rows per forward
    h = torch.randn(2, 5, native.cfg.d_model, generator=torch.Generator().manual_seed(2))
    rows = h.reshape(-1, h.shape[-1])
    for layer in (0, 2):
        alone = torch.cat([one_chunk.transform_hidden(row[None], layer) for row in rows]).reshape(h.shape)
        torch.testing.assert_close(one_chunk.transform_hidden(h, layer), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked.transform_hidden(h, layer), alone, atol=1e-5, rtol=0)
    assert chunked.chunk_rows == 3 and chunked.usage == {**chunked.usage, "rows": 20, "forwards": 8,
                                                         "positions": 20 * len(PROMPT_IDS)}


def test_gradients_reach_h(native):
    h = torch.randn(3, native.cfg.d_model, requires_grad=True)
    PatchscopeLens(native, PROMPT_IDS)(h, 1).logsumexp(-1).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_prompts_are_checked(native, tiny_gpt2):
    with pytest.raises(ValueError, match="no tokenizer.*token ids"):
        PatchscopeLens(native)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        PatchscopeLens(native, [0, 40])
    with pytest.raises(ValueError, match="1..32 integer token ids"):
        PatchscopeLens(native, [])
    with pytest.raises(ValueError, match="empty"):
        PatchscopeLens(tiny_gpt2[0], "")
    assert prompt_ids(tiny_gpt2[0])[0, 0] == 48 and PatchscopeLens(tiny_gpt2[0]).prompt == IDENTITY_PROMPT  # BOS first


def test_compare_scores_a_patchscope_column(tiny_gpt2):
    import lensmat

    model, _, corpus = tiny_gpt2
    prompt = "w3 w3 w8 w8 w5"
    r = lensmat.compare(model, str(corpus), lenses=("logit", "mat", "patchscope"), patchscope_prompt=prompt,
                        max_fit_tokens=400, max_eval_tokens=120, max_length=24, progress=False)
    L = r["n_layers"]
    assert list(r["lenses"]) == ["logit", "mat", "patchscope"]
    for metric in ("precision@1", "precision@5", "precision@10", "surprisal", "kl", "ce"):
        assert len(r["lenses"]["patchscope"][metric]) == L + 1, metric
    assert r["lenses"]["patchscope"]["precision@1"][L] == r["lenses"]["logit"]["precision@1"][L] == 1.0
    assert r["lenses"]["patchscope"]["kl"][:L] != r["lenses"]["logit"]["kl"][:L]
    cost = r["fit_cost"]["patchscope"]
    assert cost["seconds"] == 0.0 and cost["settings"]["prompt"] == prompt and cost["settings"]["forward"] == "kv-cache"
    assert cost["usage"]["rows"] == L * r["n_eval_tokens"] and cost["usage"]["seconds"] > 0
    assert any(item.startswith("patchscope rows and forwards") for item in r["memory_plan"]["bytes"])


def test_a_masked_lm_is_refused(tiny_bert):
    import lensmat

    model, _, corpus = tiny_bert
    with pytest.raises(ValueError, match="patchscope lens reads the next token .* no next-token identity prompt; "
                                         "use logit, mat, mat-affine"):
        lensmat.compare(model, str(corpus), lenses="logit,patchscope", progress=False)
    with pytest.raises(ValueError, match=r"\['tuned'\] are trained on next-token prediction .*patchscope"):
        lensmat.compare(model, str(corpus), lenses="tuned,patchscope", progress=False)
    with pytest.raises(ValueError, match="masked LM"):
        PatchscopeLens(model)


def test_the_command_line_passes_the_prompt_on(tiny_gpt2, tmp_path):
    import json

    from lensmat import cli

    _, folder, corpus = tiny_gpt2
    argv = ["compare", "--model", str(folder), "--dataset", str(corpus), "--lenses", "logit,patchscope",
            "--patchscope-prompt", "w3 w3 w5", "--max-fit-tokens", "300", "--max-eval-tokens", "60", "--max-length", "24",
            "--out", str(tmp_path / "cmp"), "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["fit_cost"]["patchscope"]["settings"]["prompt_ids"] == [48, 3, 3, 5]
