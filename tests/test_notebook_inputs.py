"""What a notebook has, accepted as it is (issue 35, items 3 and 6): texts as a list of strings, a
``datasets.Dataset`` or token ids beside corpus specs; a bare string that is neither a path nor an
``hf:`` spec refused; one name per meaning (``max_fit_tokens``, ``blocks=``, memory sizes with units,
``LinearMap.weight``), the old spellings kept with a DeprecationWarning."""

import warnings

import pytest
import torch

import lensmat
from lensmat import data
from lensmat.stats.pipeline import tokenized
from lensmat.stats.plan import parse_bytes


def test_a_list_of_strings_and_a_dataset_read_like_the_same_lines_in_a_file(tmp_path):
    import datasets

    texts = [f"line {i}" for i in range(10)] + ["  ", ""]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(texts) + "\n")
    for split in data.SPLITS:
        expected = data.load_lines(str(path), split)
        assert data.load_lines(texts, split) == expected
        assert data.load_lines(datasets.Dataset.from_dict({"text": texts}), split) == expected
    assert data.describe_spec(texts) == "<12 texts>"


@pytest.mark.parametrize("spec, message", [("wikitext", r"neither an existing file .* 'hf:wikitext'"),
                                           (["a", 3], "strings only"), (["", " "], "all empty")])
def test_what_is_not_text_is_refused_naming_the_fix(spec, message):
    with pytest.raises(data.CorpusError, match=message):
        data.load_lines(spec)


def test_token_ids_are_read_as_the_rows_given_and_checked(tiny_gpt2):
    model, _, _ = tiny_gpt2
    ids = torch.randint(0, int(model.cfg.d_vocab), (10, 7), generator=torch.Generator().manual_seed(0))
    corpus = tokenized(model, ids, "all")
    assert corpus.seqs == ids.tolist() and corpus.dataset == "<10 token sequences>"
    assert tokenized(model, ids, "heldout").seqs == ids[7:].tolist()
    assert tokenized(model, ids[0], "all").seqs == [ids[0].tolist()]
    with pytest.raises(ValueError, match=r"lie in \[0, "):
        tokenized(model, ids + int(model.cfg.d_vocab), "all")
    with pytest.raises(ValueError, match="integer tensor"):
        tokenized(model, ids.float(), "all")


def test_fit_maps_on_a_list_of_strings_equals_fit_maps_on_the_same_file(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    texts = corpus.read_text().splitlines()
    from_file = lensmat.fit_maps(model, str(corpus), max_fit_tokens=300, progress=False)
    from_list = lensmat.fit_maps(model, texts, max_fit_tokens=300, progress=False)
    for pair, m in from_file.maps.items():
        torch.testing.assert_close(from_list.maps[pair].W, m.W, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match=r"max_tokens=\.\.\.\) is now fit_maps\(max_fit_tokens"):
        old = lensmat.fit_maps(model, texts, max_tokens=300, progress=False)
    assert old.provenance["n_tokens"] == from_list.provenance["n_tokens"]
    with pytest.raises(TypeError, match="pass 'max_fit_tokens' only"):
        lensmat.fit_maps(model, texts, max_tokens=300, max_fit_tokens=300, progress=False)


def test_swap_takes_blocks_and_still_the_old_layers_keyword(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    maps = lensmat.fit_submodule_maps(model, str(corpus), kinds=["attn"], blocks=[1], max_fit_tokens=200, progress=False)
    assert {pair[0] for pair in maps.maps} == {"blocks.1.ln1.hook_out"}
    new = lensmat.swap_hooks(model, maps, ["attn"], blocks=[1])
    with pytest.warns(DeprecationWarning, match="layers=.*blocks="):
        old = lensmat.swap_hooks(model, maps, ["attn"], layers=[1])
    assert [name for name, _ in new] == [name for name, _ in old] == ["blocks.1.ln1.hook_out", "blocks.1.hook_attn_out"]


def test_linear_map_weight_is_the_nn_linear_orientation():
    g = torch.Generator().manual_seed(0)
    m = lensmat.LinearMap(torch.randn(5, 3, generator=g), torch.randn(3, generator=g), "a", "b")
    linear = torch.nn.Linear(5, 3)
    with torch.no_grad():
        linear.weight.copy_(m.weight)
        linear.bias.copy_(m.b)
    x = torch.randn(4, 5, generator=g)
    torch.testing.assert_close(linear(x), m(x))
    assert m.weight.shape == (3, 5)


def test_memory_sizes_carry_their_unit_in_python_and_on_the_command_line():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("16 GiB") == 16 * 2**30 and parse_bytes(1000) == 1000
    for bad in ("8 parsecs", "infGB", "-1MB", 0):
        with pytest.raises(ValueError, match="e.g. '8GB'"):
            parse_bytes(bad)
    from lensmat.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["compare", "--memory-limit", "512MB"]).memory_limit == 512 * 10**6
    assert parser.parse_args(["compare", "--memory-limit", "8"]).memory_limit == 8 * 10**9  # a bare number is GB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_bytes(None) is None


def test_generate_takes_the_prompt_as_text_or_ids(tiny_gpt2):
    from lensmat.analyses.generation import prompt_ids

    model, _, _ = tiny_gpt2
    ids = prompt_ids(model, "w1 w4 w7")
    assert ids == lensmat.tokenized(model, ["w1 w4 w7"], "all").seqs[0]
    by_text = lensmat.generate(model, None, "w1 w4 w7", 4)
    by_ids = lensmat.generate(model, None, torch.tensor(ids), 4)
    assert by_text["tokens"] == by_ids["tokens"] and by_text["text"] == model.tokenizer.decode(by_ids["tokens"])
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        lensmat.generate(model, None, [], 2)


def test_evaluate_lenses_reads_text_as_given(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    texts = corpus.read_text().splitlines()[:20]
    lenses = {"logit": lensmat.LogitLens(model)}
    by_text = lensmat.evaluate_lenses(model, lenses, texts, progress=False)
    by_batches = lensmat.evaluate_lenses(model, lenses, tokenized(model, texts, "all").batches(16), progress=False)
    assert by_text.scores == by_batches.scores and by_text.n_tokens == by_batches.n_tokens > 0
    heldout = lensmat.evaluate_lenses(model, lenses, str(corpus), progress=False)  # a spec: its heldout split
    assert heldout.n_tokens == tokenized(model, str(corpus), "heldout").n_tokens()


def test_evaluation_builds_no_autograd_graph(tiny_gpt2):
    """Lenses pass gradients on, so the evaluation loops turn them off themselves."""
    model, _, corpus = tiny_gpt2
    seen = []

    class Probe(lensmat.Lens):
        def transform_hidden(self, h, layer):
            seen.append(torch.is_grad_enabled())
            return h

    lensmat.evaluate_lenses(model, {"probe": Probe(model)}, str(corpus), progress=False)
    lensmat.trajectory(model, {"probe": Probe(model)}, "w1 w4 w7")
    assert seen and not any(seen)
