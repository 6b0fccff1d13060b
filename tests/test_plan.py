"""The memory plan: its byte counts against the tensors really allocated, the refusal path, the
config-only plans of large model shapes, and bounded memory on a synthetic 12×768 run."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model, random_token_batches

import lensmat
from lensmat.stats.collect import collect, resid_hooks, site_hooks
from lensmat.stats.plan import MemoryPlanError, ModelShape, plan, resolve_stats_device, shape_from_config
from lensmat.stats.gram import GramStats, pair_pattern, stats_nbytes
from lensmat.analyses.submodules import groups_for, submodule_pairs


@pytest.mark.parametrize("pattern", ["to_last", "adjacent", "all"])
@pytest.mark.parametrize("dims", [(5, 5, 5, 5), (3, 7, 2), (4,)])
def test_stats_nbytes_equals_the_allocated_tensors(pattern, dims):
    pairs = pair_pattern(len(dims), pattern)
    assert stats_nbytes(dims, pairs) == GramStats(tuple(f"h{i}" for i in range(len(dims))), dims, pairs=pairs).nbytes


def stats_items(p):
    return {k: v for k, v in p.items.items() if "statistics" in k}


@pytest.mark.parametrize("all_pairs", [False, True])
def test_plan_counts_the_statistics_the_collector_allocates(all_pairs):
    model = make_tiny_model(n_layers=3, d_model=16)
    batches = random_token_batches(1, 4, 12, 40, seed=0)
    resid = collect(model, batches, [resid_hooks(3)], pairs=[pair_pattern(4, "all" if all_pairs else "to_last")],
                    progress=False)[0]
    compare_plan = plan("compare", ModelShape.of(model), all_pairs=all_pairs)
    assert list(stats_items(compare_plan).values()) == [resid.nbytes, resid.nbytes]  # train and held-out


def test_plan_counts_the_mid_site_statistics_compare_allocates():
    model = make_tiny_model(n_layers=3, d_model=16)
    batches = random_token_batches(1, 4, 12, 40, seed=0)
    mid = site_hooks(3, "mid")
    groups = [mid + resid_hooks(3), resid_hooks(3), mid + [resid_hooks(3)[-1]]]  # train; held-out post and mid
    stats = collect(model, batches, groups, pairs=[pair_pattern(len(g), "to_last") for g in groups], progress=False)
    assert list(stats_items(plan("compare", ModelShape.of(model), mid=True)).values()) == [st.nbytes for st in stats]


def test_plan_counts_linearity_and_submodule_statistics():
    model = make_tiny_model(n_layers=3, d_model=16)
    shape = ModelShape.of(model)
    batches = random_token_batches(1, 4, 12, 40, seed=0)
    adjacent = collect(model, batches, [resid_hooks(3)], pairs=[pair_pattern(4, "adjacent")], progress=False)[0]
    assert list(stats_items(plan("linearity", shape)).values()) == [adjacent.nbytes, adjacent.nbytes]
    resid = collect(model, batches, [resid_hooks(3)], pairs=[pair_pattern(4, "to_last")], progress=False)[0]
    groups = groups_for(submodule_pairs(model, ["attn", "mlp", "ln"]))
    sub = collect(model, batches, groups, progress=False)
    assert len(groups) == 4 * 3  # ln1, attn, ln2, mlp per block: the plan's default
    for p in (plan("submodules", shape), plan("submodules", shape, n_submodule_groups=len(groups))):
        assert list(stats_items(p).values()) == [resid.nbytes, sum(st.nbytes for st in sub)]


def test_every_command_reports_its_plan_and_a_tiny_limit_refuses_before_any_work(reference_model, tmp_path):
    report = lensmat.compare(reference_model, max_fit_tokens=300, max_eval_tokens=50, progress=False)
    shape = ModelShape.of(reference_model)
    assert report["memory_plan"]["shape"]["n_layers"] == shape.n_layers
    expected = stats_items(plan("compare", shape))
    assert {k: v for k, v in report["memory_plan"]["bytes"].items() if "statistics" in k} == expected
    with pytest.raises(MemoryPlanError, match=r"needs .* GB on cpu .* but 0\.00 GB is available(.|\n)*Cheaper: drop --all-pairs"):
        lensmat.compare(reference_model, all_pairs=True, memory_limit=1_000, out=tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()  # refused before writing anything
    for fn in (lensmat.linearity, lensmat.saturation, lensmat.early_exit, lensmat.submodules):
        with pytest.raises(MemoryPlanError, match="Cheaper"):
            fn(reference_model, memory_limit=1_000, progress=False)


def test_cli_refusal_names_the_problem_and_the_cheaper_option(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lensmat", "compare", "--all-pairs", "--memory-limit", "0.001",
                          "--quiet", "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert res.returncode == 2
    assert "needs" in res.stderr and "drop --all-pairs" in res.stderr and "train statistics" in res.stderr


def test_stats_device_is_checked_before_any_work():
    with pytest.raises(ValueError, match="not a device name"):
        resolve_stats_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device; use --stats-device cpu"):
            resolve_stats_device("cuda")
    assert resolve_stats_device(None) == "cpu"


def write_config(folder, kind):
    from transformers import GPT2Config, LlamaConfig

    config = (GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257) if kind == "gpt2-xl" else
              LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=32000))
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, n_layers, d, limit, params", [
    ("gpt2-xl", 48, 1600, 2.2e9, 1.558e9),  # the largest model of "Jump to Conclusions"
    ("llama-7b", 32, 4096, 9e9, 6.738e9),
])
def test_large_shapes_plan_from_their_config_within_the_targets(tmp_path, kind, n_layers, d, limit, params):
    shape = shape_from_config(write_config(tmp_path / kind, kind))
    assert (shape.n_layers, shape.d_model) == (n_layers, d)
    assert shape.weight_bytes == pytest.approx(4 * params, rel=2e-3)  # counted on the meta device
    fit = plan("fit", shape)
    train = stats_items(fit)["train statistics, blocks (l, l), (l, L)"]
    assert train == 8 * ((2 * n_layers + 1) * d * d + (n_layers + 1) * d) and train <= limit
    everything = stats_items(plan("fit", shape, all_pairs=True))["train statistics, every layer pair"]
    assert everything == 8 * ((n_layers + 1) * (n_layers + 2) // 2 * d * d + (n_layers + 1) * d)
    res = subprocess.run([sys.executable, "-m", "lensmat", "plan", "--model", str(tmp_path / kind), "--command", "fit"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{n_layers} blocks, d_model {d}" in res.stdout and f"{train / 1e9:.3f} GB" in res.stdout


def test_a_synthetic_12x768_run_keeps_memory_flat_in_tokens(tmp_path):
    """Peak RSS of the real accumulation over 256 vs 2,048 tokens of GPT-2-small-shaped activations."""
    script = tmp_path / "run.py"
    script.write_text(
        "import resource, sys, torch\n"
        "from lensmat.stats.gram import GramStats, pair_pattern\n"
        "n = int(sys.argv[1]); torch.manual_seed(0)\n"
        "st = GramStats(tuple(map(str, range(13))), (768,) * 13, pairs=pair_pattern(13, 'to_last'))\n"
        "for _ in range(n // 128):\n"
        "    st.update(torch.randn(128, 13 * 768))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, st.nbytes, st.n)\n")
    peaks = {}
    for n in (256, 2048):
        out = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, check=True).stdout
        peak, nbytes, seen = map(int, out.split())
        assert seen == n and nbytes == stats_nbytes((768,) * 13, pair_pattern(13, "to_last"))
        peaks[n] = peak
    # 1,792 more tokens would add 1792 × 13 × 768 × 8 = 143 MB if anything were kept per token
    assert peaks[2048] - peaks[256] < 40e6, json.dumps(peaks)


def test_config_plans_follow_each_commands_default_lenses():
    shape = ModelShape("x", 4, 8, 50)
    assert not stats_items(plan("saturation", shape))  # the logit lens: no maps fitted
    assert stats_items(plan("saturation", shape, fits_maps=True))  # --lens mat
    assert stats_items(plan("early-exit", shape))  # logit and mat by default
