"""Saturation layers, the order test and the task probe on hand-built rankings; the lens
plumbing and the implant hook on a tiny model."""

import pytest
import torch
from conftest import random_token_batches

from lensmat.lenses import LogitLens
from lensmat.saturation import (collect_rankings, implanted_top1, kept_tokens, leading_saturated, mean_ranks,
                                order_test, probe_accuracy, saturation_layers, strict_kendall_tau, task_labels)


def test_saturation_layers_on_hand_built_rankings():
    # 4 layers (0..3), 5 tokens, K = 2; final ranks per token below.
    final = torch.tensor([[7, 2], [7, 9], [1, 2], [3, 4], [5, 6]])
    per_token = [
        [[5, 1], [7, 1], [7, 2], [7, 2]],  # s = (1, 2)
        [[7, 9], [8, 9], [7, 9], [7, 9]],  # agrees at layer 0, leaves, returns: s = (2, 0)
        [[1, 2], [1, 2], [1, 2], [1, 3]],  # rank 2 never settles, even at the last layer: s = (0, 4)
        [[3, 4], [3, 4], [3, 4], [3, 4]],  # settled from the embeddings: s = (0, 0), a tie
        [[6, 5], [6, 5], [5, 6], [5, 6]],  # swapped top-2 until layer 2: s = (2, 2), a tie
    ]
    lens_topk = torch.tensor(per_token).transpose(0, 1)
    s = saturation_layers(lens_topk, final)
    assert s.tolist() == [[1, 2], [2, 0], [0, 4], [0, 0], [2, 2]]


def test_kept_tokens_and_leading_ranks():
    s = torch.tensor([[1, 2, 8, 3], [7, 7, 7, 7], [0, 1, 2, 5], [8, 8, 8, 8]])
    assert kept_tokens(s, 8).tolist() == [True, False, True, False]  # s_1 ≤ 0.85·8 = 6.8
    assert leading_saturated(s, 8).tolist() == [2, 4, 4, 0]


def test_strict_kendall_tau_counts_ties_as_discordant():
    s = torch.tensor([[1, 2, 3], [3, 2, 1], [1, 1, 2], [2, 2, 2], [1, 3, 2]])
    assert strict_kendall_tau(s).tolist() == pytest.approx([1.0, -1.0, 1 / 3, -1.0, 1 / 3])


def test_mean_ranks_share_ties():
    assert mean_ranks(torch.tensor([[1, 2, 3], [2, 2, 1]])) == pytest.approx([1.75, 2.25, 2.0])


def test_order_test_separates_ordered_from_shuffled_layers():
    g = torch.Generator().manual_seed(0)
    ordered = torch.sort(torch.randint(0, 12, (200, 5), generator=g), dim=1).values
    ordered = ordered + torch.arange(5)  # strictly increasing, all below L = 20
    res = order_test(ordered, 20, n_permutations=200)
    assert res["kendall_tau"] == pytest.approx(1.0) and res["n_tokens"] == 200
    assert res["p_value"] == pytest.approx(1 / 201)
    shuffled = torch.randint(0, 16, (200, 5), generator=g)
    res = order_test(shuffled, 20, n_permutations=200)
    assert res["kendall_tau"] < 0.0  # ties are discordant, so random layers score below zero
    assert res["p_value"] > 0.05
    assert order_test(torch.full((4, 5), 20), 20)["n_tokens"] == 0  # nothing saturates before L


def test_task_labels_follow_saturation_layers():
    labels = task_labels(torch.tensor([[1, 3], [0, 0]]), 4)  # layers 0..4
    assert labels[:, 0].tolist() == [1, 1, 2, 2, 0]
    assert labels[:, 1].tolist() == [1, 0, 0, 0, 0]


def test_probe_reads_a_task_that_is_written_in_the_features():
    g = torch.Generator().manual_seed(1)
    n, d = 300, 6
    labels = torch.randint(1, 4, (2, n), generator=g)
    resid = torch.randn(2, n, d, generator=g)
    resid[0, :, 0] += 4.0 * labels[0]  # layer 0 encodes its task; layer 1 does not
    acc = probe_accuracy(resid, labels)
    control = probe_accuracy(resid, labels, control=True)
    assert acc[0] > 0.9 and acc[1] < 0.55
    assert control[0] < 0.55
    one_class = probe_accuracy(resid[:1], torch.ones(1, n, dtype=torch.int64))
    assert one_class == [None]


def test_rankings_at_the_last_layer_are_the_model_and_implanting_a_tokens_own_state_changes_nothing(tiny_model):
    batches = random_token_batches(1, 4, 12, 40, seed=2)
    seqs = [batches[0].tokens[i, : int(batches[0].attention_mask[i].sum())].tolist() for i in range(4)]
    lens = LogitLens(tiny_model)
    r = collect_rankings(tiny_model, lens, seqs, k=3, progress=False)
    n_layers = 3
    assert r.lens_topk.shape == (n_layers + 1, len(r.origin), 3)
    assert torch.equal(r.lens_topk[-1], r.final_topk)
    line, pos = r.origin[5]
    assert r.origin[0] == (0, 1)  # BOS never scored
    own = implanted_top1(tiny_model, lens, seqs[line][: pos + 1], pos, 1, r.resid[1, 5])
    assert own.tolist() == r.lens_topk[:, 5, 0].tolist()
    other = implanted_top1(tiny_model, lens, seqs[line][: pos + 1], pos, 1, 50 * r.resid[1, 0])
    assert other.tolist() != own.tolist()
