"""End-to-end runs on the bundled reference model and real held-out text (slow; run in CI)."""

import json
import subprocess
import sys

import pytest

import lensmat
from lensmat.tuned import TunedLensConfig, train_tuned_lens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compare_report(reference_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    report = lensmat.compare(reference_model, lenses="logit,mat,mat-affine", max_fit_tokens=60_000,
                             max_eval_tokens=8_000, out=out, progress=False)
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
    lens = train_tuned_lens(reference_model, None, TunedLensConfig(tokens=30_000), progress=False)
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
    assert bad.returncode == 2 and "valid lenses: logit, mat, mat-affine, tuned, jacobian" in bad.stderr


def test_reports_are_deterministic_apart_from_wall_clock(compare_report, reference_model):
    report, _ = compare_report
    again = lensmat.compare(reference_model, lenses="logit,mat,mat-affine", max_fit_tokens=60_000,
                            max_eval_tokens=8_000, progress=False)
    strip = lambda r: json.dumps({k: v for k, v in r.items() if k != "fit_cost"}, sort_keys=True)  # noqa: E731
    assert strip(report) == strip(again)
