"""Saturation layers, the order test and the task probe on hand-built rankings; the lens
plumbing and the implant hook on a tiny model."""

import pytest
import torch
from conftest import random_token_batches

from lensmat.lenses.base import LogitLens
from lensmat.stats.pipeline import Tokenized
import numpy as np

from lensmat.analyses.saturation import kept_tokens, mean_ranks, order_prefix, order_test, strict_kendall_tau
from lensmat.analyses.saturation_implant import implant, implant_pairs, implanted_top1
from lensmat.analyses.saturation_probes import pooled_probe, pooled_probe_data, probe_accuracy, task_labels
from lensmat.analyses.saturation_rankings import collect_rankings, saturation_layers


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
    # the protocol reads block outputs only (layers 1..L), as the authors' code does
    assert saturation_layers(lens_topk, final, start=1).tolist() == [[1, 2], [2, 1], [1, 4], [1, 1], [2, 2]]


def test_kept_tokens_use_the_authors_block_output_threshold():
    s = torch.tensor([[1, 2, 8, 3], [7, 7, 7, 7], [0, 1, 2, 5], [8, 8, 8, 8]])
    # authors: block output index ≤ int(0.85·8) = 6, i.e. residual layer ≤ 7
    assert kept_tokens(s, 8).tolist() == [True, True, True, False]
    assert kept_tokens(torch.tensor([[18], [19]]), 20).tolist() == [True, False]  # int(17.0) + 1


def test_order_prefix_rules():
    s = torch.tensor([[1, 2, 8, 3], [7, 7, 7, 7], [0, 1, 2, 5], [8, 8, 8, 8], [1, 8, 8, 8]])
    assert order_prefix(s, 8, "authors").tolist() == [4, 4, 4, 0, 1]  # up to the last rank saturated before L
    assert order_prefix(s, 8, "leading").tolist() == [2, 4, 4, 0, 1]  # the leading run only
    with pytest.raises(ValueError, match="order rule"):
        order_prefix(s, 8, "paper")


def _ktau_strict(a, b):
    """The authors' strict τ, pair by pair: a tie counts as concordant only when tied in both."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    conc = sum((a[i] > a[j] and b[i] > b[j]) or (a[i] < a[j] and b[i] < b[j]) or (a[i] == a[j] and b[i] == b[j])
               for i, j in pairs)
    return (2 * conc - len(pairs)) / len(pairs)


def _authors_mean_tau(rows, n_layers, rng=None):
    """The authors' mean τ, token by token: ranks up to the last one saturated before L; with ``rng``,
    one draw of their null (all K layers of a token permuted, then truncated)."""
    taus = []
    for row in rows:
        m = max(i for i, v in enumerate(row) if v != n_layers) + 1
        if rng is not None:
            row = list(rng.permutation(row))
        if m >= 3:
            taus.append(_ktau_strict(list(range(m)), list(row[:m])))
    return float(np.mean(taus)), len(taus)


def test_order_test_matches_the_authors_rule_and_null():
    n_layers = 10
    rng = np.random.default_rng(0)
    s = rng.integers(1, n_layers + 1, (150, 5))
    s[:, 0] = rng.integers(1, n_layers, 150)  # kept tokens: s_1 < L
    s[:8] = np.sort(s[:8], 1)  # a weak order, so the p-value is neither 0 nor 1
    tau, n = _authors_mean_tau(s.tolist(), n_layers)
    null = np.array([_authors_mean_tau(s.tolist(), n_layers, rng)[0] for _ in range(1000)])
    res = order_test(torch.tensor(s), n_layers, rule="authors", n_permutations=1000)
    assert res["kendall_tau"] == pytest.approx(tau) and res["n_tokens"] == n == 150
    assert abs(res["p_value"] - (null >= tau - 1e-12).mean()) < 0.03  # two Monte Carlo estimates (sd ≈ 0.007)
    leading = order_test(torch.tensor(s), n_layers, rule="leading", n_permutations=1000)
    assert leading["n_tokens"] < n and leading["kendall_tau"] != pytest.approx(tau)  # the rules differ here


def test_strict_kendall_tau_counts_ties_as_discordant():
    s = torch.tensor([[1, 2, 3], [3, 2, 1], [1, 1, 2], [2, 2, 2], [1, 3, 2]])
    assert strict_kendall_tau(s).tolist() == pytest.approx([1.0, -1.0, 1 / 3, -1.0, 1 / 3])


def test_mean_ranks_follow_the_authors():
    # ties take the lowest rank; ranks saturated only at L (= 4) are left out of their mean
    assert mean_ranks(torch.tensor([[1, 2, 3], [2, 2, 1], [1, 4, 4]]), 4) == pytest.approx([4 / 3, 2.0, 2.0])
    assert mean_ranks(torch.tensor([[1, 4], [2, 4]]), 4) == [1.0, None]
    rng = np.random.default_rng(1)
    s = rng.integers(1, 9, (60, 5))
    ref = [[sorted(row).index(v) + 1 for v in row[k:k + 1] if v < 8] for row in s.tolist() for k in range(5)]
    per_k = [[r for i, r in enumerate(ref) if i % 5 == k] for k in range(5)]
    expected = [np.mean([x for r in rows for x in r]) for rows in per_k]
    assert mean_ranks(torch.tensor(s), 8) == pytest.approx(expected)


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


def test_pooled_probe_data_balances_tasks_per_layer_as_the_authors_do():
    # 12 tokens, K = 2, L = 4: s = (1, 3) for 8 tokens, (2, 4) for 4 tokens
    s = torch.tensor([[1, 3]] * 8 + [[2, 4]] * 4)
    resid = torch.arange(5 * 12 * 1, dtype=torch.float32).reshape(5, 12, 1)
    x, y, used = pooled_probe_data(resid, task_labels(s, 4), start=1, min_per_task=2)
    # task i where s_{i-1} < l <= s_i: layer 1 is task 1 for all 12 (no task 2: left out); layer 2 is task 2
    # for the 8 early tokens and task 1 for the 4 late ones (m = 4); layers 3 and 4 hold no task 1
    assert used == [2]
    assert y.tolist() == [1] * 4 + [2] * 4
    assert x[:4, 0].tolist() == resid[2, 8:12, 0].tolist()  # the first m of each task, in token order
    assert x[4:, 0].tolist() == resid[2, :4, 0].tolist()


def test_pooled_probe_reads_an_encoded_task_and_its_noise_control_does_not():
    g = torch.Generator().manual_seed(0)
    n, d, L = 600, 8, 8
    s1 = torch.randint(1, 5, (n,), generator=g)
    s = torch.stack([s1, s1 + torch.randint(1, 4, (n,), generator=g), torch.full((n,), L)], 1)  # 3 tasks
    labels = task_labels(s, L)
    resid = torch.randn(L + 1, n, d, generator=g)
    for t in (1, 2, 3):  # task t: +3 on feature t, −3 on feature t+3: every task has the same scalar mean and spread
        resid[..., t] += 3.0 * (labels == t)
        resid[..., t + 3] -= 3.0 * (labels == t)
    res = pooled_probe(resid, s, L, start=1)
    assert res["balanced_accuracy"] > 0.95 and min(res["roc_auc"]) > 0.98 and res["n_samples"] > 0
    control = pooled_probe(resid, s, L, start=1, control=True)
    assert control["balanced_accuracy"] < 0.45  # chance is 1/3
    scrambled = pooled_probe(torch.randn(L + 1, n, d, generator=g), s, L, start=1)
    assert scrambled["balanced_accuracy"] < 0.45 and max(scrambled["roc_auc"]) < 0.6
    assert pooled_probe(resid[:, :3], s[:3], L, start=1)["balanced_accuracy"] is None  # too few tokens
    assert len(pooled_probe(resid, s, L, n_tasks=2, start=1)["roc_auc"]) == 2  # tasks after the second left out


def test_rankings_at_the_last_layer_are_the_model_and_implanting_a_tokens_own_state_changes_nothing(tiny_model):
    batches = random_token_batches(1, 4, 12, 40, seed=2)
    seqs = [batches[0].tokens[i, : int(batches[0].attention_mask[i].sum())].tolist() for i in range(4)]
    lens = LogitLens(tiny_model)
    r = collect_rankings(tiny_model, lens, Tokenized(seqs, "random", "all", 32), k=3, progress=False)
    n_layers = 3
    assert r.lens_topk.shape == (n_layers + 1, len(r.origin), 3)
    assert torch.equal(r.lens_topk[-1], r.final_topk)
    line, pos = r.origin[5]
    assert r.origin[0] == (0, 1)  # BOS never scored
    assert r.inputs == dict(enumerate(seqs))  # each line as it was run
    own = implanted_top1(tiny_model, lens, r.inputs[line], pos, 1, r.resid[1, 5])
    assert own.tolist() == r.lens_topk[:, 5, 0].tolist()
    assert own.tolist() == implanted_top1(tiny_model, lens, seqs[line][: pos + 1], pos, 1, r.resid[1, 5]).tolist()  # causal
    other = implanted_top1(tiny_model, lens, r.inputs[line], pos, 1, 50 * r.resid[1, 0])
    assert other.tolist() != own.tolist()


def test_implant_sweep_counts_success_only_where_the_new_s1_is_the_implanted_layer(tiny_model):
    batches = random_token_batches(2, 6, 14, 40, seed=3)
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist() for b in batches for i in range(6)]
    lens = LogitLens(tiny_model)
    r = collect_rankings(tiny_model, lens, Tokenized(seqs, "random", "all", 32), k=1, progress=False)
    s1 = saturation_layers(r.lens_topk, r.final_topk, start=1)[:, 0]
    pairs = implant_pairs(r.final_topk[:, 0], s1, min_gap=1, max_pairs=30)
    assert pairs and all(int(s1[late] - s1[early]) >= 1 and int(r.final_topk[early, 0]) == int(r.final_topk[late, 0])
                         for early, late in pairs)
    res = implant(tiny_model, lens, r, s1, offsets=(-1, 0, 1), pairs=pairs)
    expected = {o: [0, 0] for o in (-1, 0, 1)}  # successes, trials, recomputed from the lens readouts directly
    for early, late in pairs:
        line, pos = r.origin[late]
        for o in (-1, 0, 1):
            j = int(s1[early]) + o
            if 0 <= j < int(s1[late]):
                top1 = implanted_top1(tiny_model, lens, seqs[line], pos, j, r.resid[j, early])
                matches = (top1 == top1[-1]).tolist()
                new_s1 = next(layer for layer in range(1, 4) if all(matches[layer:]))  # block outputs 1..L only
                expected[o][0] += int(new_s1 == j and int(top1[-1]) == int(r.final_topk[late, 0]))
                expected[o][1] += 1
    got = {row["offset"]: row for row in res["by_offset"]}
    for o, (hits, n) in expected.items():
        assert got[o]["n_trials"] == n
        assert got[o]["success"] == (hits / n if n else None)
    assert res["success"] == got[0]["success"] and res["n_pairs"] == len(pairs)
    assert all(n > 0 for _, n in expected.values())  # every offset was tried
    assert 0 < sum(h for h, _ in expected.values()) < sum(n for _, n in expected.values())  # hits and misses
