"""End-to-end runs on the bundled reference model and real held-out text (slow; run in CI)."""

import json
import subprocess
import sys

import pytest
import torch

import lensmat
from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats
from lensmat.lenses.tuned import TunedLensTraining, train_tuned_lens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compare_report(reference_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    report = lensmat.compare(reference_model, lenses="logit,mat,mat-affine", max_fit_tokens=60_000,
                             max_eval_tokens=8_000, all_pairs=True, out=out, progress=False)
    return report, out


def test_compare_report_contract_and_plots(compare_report):
    report, out = compare_report
    L = report["n_layers"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["layers"] == list(range(L + 1))
    assert report["n_fit_tokens"] == 60_000 and report["n_eval_tokens"] == 8_000
    for name in ("logit", "mat", "mat-affine"):
        for metric in ("precision@1", "precision@5", "precision@10", "surprisal", "kl", "ce"):
            assert len(report["lenses"][name][metric]) == L + 1
        assert report["lenses"][name]["precision@1"][L] == 1.0
    for kind in ("mat", "id"):
        grid = report["r2"][kind]
        assert len(grid) == L + 1 and all(len(row) == L + 1 for row in grid)
        assert all(grid[i][j] is None for i in range(L + 1) for j in range(i + 1))
        assert all(grid[i][j] is not None for i in range(L + 1) for j in range(i + 1, L + 1))
    for png in ("precision.png", "kl.png", "surprisal.png", "ce.png", "r2.png"):
        assert (out / png).stat().st_size > 1000


def test_mat_beats_logit_at_every_layer_on_heldout_text(compare_report):
    report, _ = compare_report
    mat, logit = report["lenses"]["mat"]["precision@1"], report["lenses"]["logit"]["precision@1"]
    assert all(m >= g for m, g in zip(mat[:-1], logit[:-1])), (mat, logit)
    r2 = report["r2"]
    L = report["n_layers"]
    assert all(r2["mat"][l][L] >= r2["id"][l][L] for l in range(L))


def test_tuned_lens_lowers_heldout_kl_at_every_layer(reference_model):
    lens = train_tuned_lens(reference_model, None, TunedLensTraining(tokens=30_000), progress=False)
    heldout = lensmat.tokenized(reference_model, split="heldout")
    scores, _, _ = lensmat.evaluate_lenses(reference_model, {"logit": lensmat.LogitLens(reference_model), "tuned": lens},
                                           heldout.batches(16, 5_000), progress=False)
    L = reference_model.cfg.n_layers
    assert all(scores["tuned"]["kl"][l] < scores["logit"]["kl"][l] for l in range(L)), scores


def test_submodules_report(reference_model, tmp_path):
    report = lensmat.submodules(reference_model, max_fit_tokens=30_000, max_eval_tokens=600,
                                out=tmp_path / "sub", progress=False)
    L = report["n_layers"]
    assert set(report["variants"]) == {"attn", "mlp", "ln", "mat", "id"}
    for v in report["variants"].values():
        assert len(v["precision@1"]) == L + 1 and v["precision@1"][L] == 1.0
        assert {"precision@5", "precision@10", "surprisal"} <= set(v)
    assert all(len(s["precision@1"]) == L for s in report["single_block"].values())
    assert (tmp_path / "sub" / "report.json").exists() and (tmp_path / "sub" / "protocol.png").exists()


def test_cli_fit_then_compare_reuses_maps(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lensmat", *a, "--quiet"], capture_output=True,  # noqa: E731
                                    text=True)
    fit = run("fit", "--out", str(tmp_path / "maps"), "--max-tokens", "20000", "--all-pairs")
    assert fit.returncode == 0, fit.stderr
    cmp = run("compare", "--maps", str(tmp_path / "maps"), "--max-eval-tokens", "2000", "--out", str(tmp_path / "c"))
    assert cmp.returncode == 0, cmp.stderr
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["fit_cost"]["mat"]["reused"] is True and report["n_fit_tokens"] == 20000
    again = run("compare", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "c"))
    assert again.returncode == 2 and "--force" in again.stderr
    bad = run("compare", "--lenses", "logit,magic", "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and "valid lenses: logit, mat, mat-affine, tuned, mat-tuned, jacobian" in bad.stderr


def test_reports_are_deterministic_apart_from_wall_clock(compare_report, reference_model):
    report, _ = compare_report
    again = lensmat.compare(reference_model, lenses="logit,mat,mat-affine", max_fit_tokens=60_000,
                            max_eval_tokens=8_000, all_pairs=True, progress=False)
    strip = lambda r: json.dumps({k: v for k, v in r.items() if k not in ("fit_cost", "provenance")},  # noqa: E731
                                 sort_keys=True)
    assert strip(report) == strip(again)


def test_bfloat16_model_gives_float64_statistics_and_maps_close_to_float32(reference_model):
    """Statistics stay float64 and maps float32 when the model runs in bfloat16; the maps agree
    with float32-collected ones up to bf16's activation noise and read the same tokens."""
    bf16 = lensmat.load_model(dtype="bfloat16", device="cpu")
    train = lensmat.tokenized(reference_model, split="train")
    heldout = lensmat.tokenized(reference_model, split="heldout")
    maps = {}
    for name, model in (("fp32", reference_model), ("bf16", bf16)):
        stats = collect_layer_stats(model, train, max_tokens=6_000, progress=False)
        assert {p.dtype for p in stats.panels} == {torch.float64}
        maps[name] = maps_from_stats(model, stats, train)
    L = reference_model.cfg.n_layers
    for (src, tgt), m in maps["fp32"].maps.items():
        other = maps["bf16"].maps[(src, tgt)]
        assert other.W.dtype == m.W.dtype == torch.float32
        assert float((other.W - m.W).norm() / m.W.norm()) < 0.1, src
    lenses = {name: lensmat.MatLens(reference_model, ms) for name, ms in maps.items()}
    scores, _, _ = lensmat.evaluate_lenses(reference_model, lenses, heldout.batches(16, 1_500), progress=False)
    for layer in range(L + 1):
        assert abs(scores["bf16"]["precision@1"][layer] - scores["fp32"]["precision@1"][layer]) < 0.02


def test_cli_analyses_write_their_report_contracts(tmp_path):
    """lensmat linearity, saturation and early-exit on real text: the report fields other tools read."""
    def run(*a):
        res = subprocess.run([sys.executable, "-m", "lensmat", *a, "--quiet"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return json.loads((tmp_path / a[a.index("--out") + 1] / "report.json").read_text())

    lin = run("linearity", "--max-fit-tokens", "20000", "--max-eval-tokens", "600", "--out", str(tmp_path / "lin"))
    L = lin["n_layers"]
    assert len(lin["linearity"]) == len(lin["linearity_no_residual"]) == L
    assert all(0.0 <= v <= 1.0 for v in lin["linearity"] + lin["linearity_no_residual"])
    for key in ("heldout_linearity", "heldout_linearity_no_residual", "norm_ratio", "cosine"):
        assert len(lin[key]) == L, key
    # 20K train tokens for d=256: held out, the maps explain a little less than in sample, block by block
    assert all(h <= t + 1e-9 for h, t in zip(lin["heldout_linearity_no_residual"], lin["linearity_no_residual"]))
    assert all(0.0 < r and -1.0 <= c <= 1.0 for r, c in zip(lin["norm_ratio"], lin["cosine"]))
    for variant in ("identity", "linear"):
        rows = lin["pruning"][variant]
        assert [r["k"] for r in rows] == list(range(L // 2 + 1)) and rows[0]["precision@1"] == 1.0
        assert set(rows[0]) == {"k", "ce", "precision@1", "ci_low", "ci_high"}
        assert all(r["ci_low"]["ce"] <= r["ce"] <= r["ci_high"]["ce"] for r in rows)
    assert all(lo <= v <= hi for lo, v, hi in zip(lin["ci_low"]["heldout_linearity"], lin["heldout_linearity"],
                                                  lin["ci_high"]["heldout_linearity"]))
    sat = run("saturation", "--max-eval-tokens", "1500", "--permutations", "100", "--pairs", "10", "--out", str(tmp_path / "sat"))
    assert len(sat["mean_rank"]) == 5 and len(sat["probe_accuracy"]) == L + 1
    assert -1.0 <= sat["ci_low"]["kendall_tau"] <= sat["kendall_tau"] <= sat["ci_high"]["kendall_tau"] <= 1.0
    assert 0.0 < sat["p_value"] <= 1.0 and sat["bootstrap"]["unit"] == "document"
    assert sat["intervention_success"] is None or 0.0 <= sat["intervention_success"] <= 1.0
    ee = run("early-exit", "--max-fit-tokens", "20000", "--max-eval-tokens", "1500", "--max-probe-tokens", "1500",
             "--out", str(tmp_path / "ee"))
    for lens in ("logit", "mat"):
        assert set(ee["curves"][lens][0]) == {"lambda", "mean_layers", "precision@1", "accuracy", "ci_low", "ci_high"}
        assert 0.0 <= ee["savings"][lens] < 1.0
    assert {"probe", "gap", "cosine", "oracle"} == set(ee["saturation"])
    assert ee["saturation"]["oracle"][0]["precision@1"] == 1.0
