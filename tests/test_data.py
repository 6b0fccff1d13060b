import pytest

from lensmat import data


def test_bundled_splits_are_70_30_disjoint_and_stable():
    train = data.load_lines(split="train")
    held = data.load_lines(split="heldout")
    everything = data.load_lines(split="all")
    assert len(train) == 7000 and len(held) == 3000
    assert train + held == everything
    assert not set(train) & set(held)
    assert data.load_lines(split="train") == train  # stable across calls
    # the id<TAB> prefix is stripped
    raw_first = data.bundled_corpus_path().read_text(encoding="utf-8").splitlines()[0]
    assert raw_first.split("\t", 1)[1] == train[0]
    assert all("\t" not in line[:8] for line in everything[:100])


def test_local_txt_strips_ids_and_skips_blank(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("1\tfirst line\n\nsecond\tline with tab\n3\tthird\n" * 4, encoding="utf-8")
    lines = data.load_lines(f, "all")
    assert lines[:3] == ["first line", "second\tline with tab", "third"]
    assert len(data.load_lines(f, "train")) == 8 and len(data.load_lines(f, "heldout")) == 4


@pytest.mark.parametrize("content,match", [(b"", "no non-empty lines"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_corpus_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(data.CorpusError, match=match):
        data.load_lines(f, "all")


def test_unknown_split_and_empty_split(tmp_path):
    with pytest.raises(data.CorpusError, match="Unknown split"):
        data.load_lines(split="test")
    f = tmp_path / "one.txt"
    f.write_text("only line\n", encoding="utf-8")
    with pytest.raises(data.CorpusError, match="empty"):
        data.load_lines(f, "train")


def test_padding_masks_for_ragged_batch():
    batch = data.pad([[0, 5, 6, 7], [0, 9], [0]])
    assert batch.tokens.tolist() == [[0, 5, 6, 7], [0, 9, 0, 0], [0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch.score_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert batch.target_mask.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert batch.n_scored == 4


def test_batches_respect_token_budget():
    seqs = [[0] + list(range(1, 11))] * 5  # 10 scored tokens each
    got = list(data.batches(seqs, batch_size=2, max_tokens=25))
    assert sum(b.n_scored for b in got) == 25
    assert [b.tokens.shape[0] for b in got] == [2, 1]
    assert [b.lines for b in got] == [(0, 1), (2,)]


def test_batches_name_each_rows_line_past_skipped_lines():
    """A masked-protocol line with nothing to mask is skipped; the rows still name their lines."""
    masking = data.Masking(mask_id=4, special_ids=frozenset({9, 8}))
    seqs = [[9, 5, 6, 8], [9, 8], [9, 3, 8], [9, 8], [9, 7, 8]]
    got = list(data.batches(seqs, batch_size=2, masking=masking))
    assert [b.lines for b in got] == [(0, 2), (4,)]
    assert [b.to("cpu").lines for b in got] == [b.every_position().lines for b in got] == [(0, 2), (4,)]


def test_tokenize_prepends_bos_and_truncates_with_one_warning(reference_tokenizer):
    bos = data.bos_token_id(reference_tokenizer)
    with pytest.warns(UserWarning, match="2 of 3 lines were longer than max_length=5") as rec:
        seqs = data.tokenize(["a b c d e f g h", "one two three four five six", "hi"], reference_tokenizer, 5)
    assert len(rec) == 1
    assert all(s[0] == bos for s in seqs)
    assert [len(s) for s in seqs[:2]] == [5, 5]
    assert seqs[2] == [bos] + reference_tokenizer("hi", add_special_tokens=False)["input_ids"]
