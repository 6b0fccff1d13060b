"""Output folders lensmat owns (issue 28 item 1), honest resumes (item 2), validated options (item 3) and
one error surface (item 7): every class has a test here; docs/errors.md lists them."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat import cli, outputs
from lensmat.stats import artifacts as io
from lensmat.stats.collect import collect, resid_hooks
from lensmat.stats.fit import MapSet, fit_layer_maps
from lensmat.models import describe

ROOT = Path(__file__).resolve().parents[1]


def tiny_maps():
    model = make_tiny_model()
    stats = collect(model, random_token_batches(2, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    return MapSet(fit_layer_maps(stats), describe(model).to_dict())


# ---- item 1: output folders ----------------------------------------------------------------------------------

def test_out_that_is_a_file_inside_a_file_or_the_current_directory_is_refused(tmp_path, monkeypatch):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(outputs.OutputError, match="is a file"):
        outputs.check_out(afile)
    with pytest.raises(outputs.OutputError, match="lies inside .*notes.txt, which is a file"):
        outputs.check_out(afile / "run")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(outputs.OutputError, match="current directory"):
        outputs.check_out(".")
    with pytest.raises(outputs.OutputError, match="empty"):
        outputs.check_out(" ")


def test_out_that_contains_the_input_is_refused(tmp_path):
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("a line\n")
    with pytest.raises(outputs.OutputError, match="contains the input"):
        outputs.check_out(tmp_path / "data", force=True, inputs=[corpus])


def test_force_replaces_only_folders_lensmat_wrote(tmp_path):
    maps = tiny_maps()
    target = tmp_path / "maps"
    io.save_maps(maps, target)
    assert (target / outputs.MANIFEST).is_file()
    with pytest.raises(FileExistsError, match="--force"):
        io.save_maps(maps, target)
    io.save_maps(maps, target, force=True)  # lensmat's own: replaced
    (target / "my_notes.md").write_text("do not lose me")
    for force in (False, True):
        with pytest.raises(outputs.OutputError, match="did not write \\(my_notes.md\\)"):
            io.save_maps(maps, target, force=force)
    assert (target / "my_notes.md").read_text() == "do not lose me"
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("x")
    (foreign / "chapter2.tex").write_text("x")
    with pytest.raises(outputs.OutputError, match="chapter1.tex, chapter2.tex"):
        outputs.check_out(foreign, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    io.save_maps(maps, empty)  # an empty folder holds nothing to lose


def test_a_legacy_lensmat_folder_without_manifest_counts_as_lensmat_s(tmp_path):
    legacy = tmp_path / "old"
    (legacy / "00-model").mkdir(parents=True)
    for name in ("report.json", "precision_at_1.png", "00-model/report.json"):
        (legacy / name).write_text("{}")
    assert outputs.foreign_entries(legacy) == []
    (legacy / "data.npy").write_text("x")
    assert outputs.foreign_entries(legacy) == ["data.npy"]


def test_failed_write_leaves_nothing_and_never_blocks_the_rerun(tmp_path, monkeypatch):
    maps = tiny_maps()
    target = tmp_path / "maps"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_maps(maps, target)
    assert list(tmp_path.iterdir()) == []  # no folder, no .partial, no lock
    monkeypatch.undo()
    io.save_maps(maps, target)
    before = (target / "maps.safetensors").read_bytes()
    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError):
        io.save_maps(maps, target, force=True)
    assert (target / "maps.safetensors").read_bytes() == before  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


def test_a_killed_run_s_partial_folder_is_cleared_by_the_next_run(tmp_path):
    partial = tmp_path / ".maps.partial"
    partial.mkdir()
    (partial / "maps.safetensors").write_text("half")
    io.save_maps(tiny_maps(), tmp_path / "maps")
    assert not partial.exists() and io.load_maps(tmp_path / "maps").maps


def test_files_get_the_user_s_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.save_maps(tiny_maps(), tmp_path / "maps")
    finally:
        os.umask(old)
    assert (tmp_path / "maps").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "maps" / "meta.json").stat().st_mode & 0o777 == 0o644


def test_force_rerun_leaves_no_stale_files(tiny_gpt2, tmp_path):
    _, folder, corpus = tiny_gpt2
    out = tmp_path / "traj"
    args = ["trajectory", "--model", str(folder), "--dataset", str(corpus), "--text", "w1 w4 w7", "--lenses", "logit",
            "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    (out / "stale.png").write_bytes(b"")  # a plot an earlier run wrote (listed as lensmat's by the legacy rule)
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    manifest["files"].append("stale.png")
    (out / outputs.MANIFEST).write_text(json.dumps(manifest))
    assert cli.main([*args, "--force"]) == 0
    assert not (out / "stale.png").exists() and (out / "report.json").is_file()


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that claims ``out`` and holds it until killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from lensmat import outputs
        with outputs.claim({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_out_stops_at_once(tmp_path, capsys):
    out = tmp_path / "maps"
    proc = _hold_lock(out)
    try:
        start = time.perf_counter()
        assert cli.main(["fit", "--out", str(out), "--max-tokens", "100", "--quiet"]) == 2
        assert time.perf_counter() - start < 5
        assert f"process {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    io.save_maps(tiny_maps(), out)  # a dead process's lock is taken over
    assert not (tmp_path / ".maps.lensmat-lock").exists()


def test_checkpoint_cleanup_removes_exactly_its_own_folder(tmp_path, capsys):
    out = tmp_path / "maps"
    mine = tmp_path / "maps.checkpoint-mine"  # the old glob OUT.checkpoint* deleted this
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert cli.main(["fit", "--out", str(out), "--max-tokens", "300", "--checkpoint-every", "1", "--quiet"]) == 0
    assert (mine / "keep.txt").is_file() and not (tmp_path / "maps.checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "maps.checkpoint-mine"]


# ---- item 2: honest resume ------------------------------------------------------------------------------------

def test_resume_with_other_settings_is_refused_naming_each_difference(tmp_path):
    import lensmat

    model = lensmat.load_model()
    ckpt = tmp_path / "ckpt"
    base = dict(max_fit_tokens=400, checkpoint=ckpt, checkpoint_every=1, progress=False)
    lensmat.fit_maps(model, **base, batch_size=4)
    with pytest.raises(io.ArtifactError, match="batch_size: checkpoint 4, now 8") as err:
        lensmat.fit_maps(model, **base, batch_size=8, resume=True)
    assert "max_tokens" not in str(err.value)
    with pytest.raises(io.ArtifactError, match="max_tokens: checkpoint 400, now 500"):
        lensmat.fit_maps(model, **{**base, "max_fit_tokens": 500}, batch_size=4, resume=True)
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(f"A different line number {i}." for i in range(40)) + "\n")
    with pytest.raises(io.ArtifactError, match="corpus.dataset: checkpoint 'leipzig-wiki'") as err:
        lensmat.fit_maps(model, str(corpus), **base, batch_size=4, resume=True)
    assert "tokens_sha256" in str(err.value)
    with pytest.raises(io.ArtifactError, match="belongs to another fit: model\\."):
        lensmat.fit_maps(lensmat.load_model(random_init=3), **base, batch_size=4, resume=True)
    resumed = lensmat.fit_maps(model, **base, batch_size=4, resume=True)  # the same run: accepted
    assert resumed.provenance["n_tokens"] == 400


def test_a_checkpoint_without_the_run_s_identity_is_refused(tmp_path):
    model = make_tiny_model()
    batches = random_token_batches(4, 4, 10, 40)
    collect(model, batches, [resid_hooks(3)], checkpoint=tmp_path / "ckpt", checkpoint_every=2, progress=False)
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    del meta["run"]  # as lensmat 0.1.0 wrote it
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(io.ArtifactError, match="does not record the run"):
        collect(model, batches, [resid_hooks(3)], checkpoint=tmp_path / "ckpt", resume=True, progress=False,
                identity={"batch_size": 4})


# ---- item 3: options validated before any work ---------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["fit", "--out", "x", "--ridge", "-1"], "'-1' is out of range; give a number in [0, inf)"),
    (["fit", "--out", "x", "--checkpoint-every", "0"], "give an integer in [1, inf)"),
    (["fit", "--out", "x", "--max-tokens", "0"], "give an integer in [1, inf)"),
    (["fit", "--out", "x", "--batch-size", "nan"], "'nan' is not an integer"),
    (["saturation", "--permutations", "-5"], "'-5' is out of range"),
    (["saturation", "--k", "0"], "give an integer in [1, inf)"),
    (["submodules", "--max-eval-tokens", "0"], "give an integer in [1, inf)"),
    (["compare", "--tuned-lr", "nan"], "'nan' is not finite; give a number in (0, inf)"),
    (["compare", "--tuned-lr", "0"], "give a number in (0, inf)"),
    (["compare", "--tuned-tokens", "0"], "[1, inf)"),
    (["compare", "--memory-limit", "inf"], "not finite"),
    (["early-exit", "--retention", "1.5"], "give a number in (0, 1]"),
    (["early-exit", "--retention", "0"], "(0, 1]"),
    (["early-exit", "--masked-t", "-1"], "[0, inf)"),
    (["linearity", "--max-k", "-2"], "[0, inf)"),
    (["info", "--max-length", "0"], "[1, inf)"),
    (["info", "--random-init", "-1"], "[0, 4294967295]"),
    (["trajectory", "--text", "w", "--k", "1e400"], "not an integer"),
])
def test_numeric_options_are_checked_before_any_work(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_fit_without_out_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit"])
    assert exit_.value.code == 2 and "needs --out" in capsys.readouterr().err


# ---- item 7: one error surface --------------------------------------------------------------------------------

def test_expected_failures_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    from lensmat.stats import pipeline

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "maps"))

    monkeypatch.setattr(pipeline, "fit_maps", disk_full)
    assert cli.main(["fit", "--out", str(tmp_path / "maps"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full" in err and "Traceback" not in err
    monkeypatch.setenv("LENSMAT_DEBUG", "1")
    assert cli.main(["fit", "--out", str(tmp_path / "maps"), "--quiet"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_exception_keeps_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch, capsys):
    from lensmat.stats import pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "fit_maps", bug)
    assert cli.main(["fit", "--out", str(tmp_path / "maps"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "please report it" in err


def test_a_missing_cuda_device_is_refused_when_parsing(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for option in ("--device", "--stats-device"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", "--out", "x", option, "cuda"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "no CUDA device" in err and "--device cpu" in err and "Traceback" not in err


def test_ctrl_c_during_fit_exits_130_with_the_resume_command(tmp_path):
    out = tmp_path / "maps"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # the child starts with SIGINT's default action even when this run was started as a background job of a
    # shell script, which ignores SIGINT (an ignore that Python, and so lensmat, keeps)
    proc = subprocess.Popen([sys.executable, "-m", "lensmat", "fit", "--out", str(out), "--checkpoint-every", "1",
                             "--batch-size", "2", "--quiet"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "maps.checkpoint" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    assert lines[0].endswith(f"lensmat fit --out {out} --checkpoint-every 1 --batch-size 2 --quiet --resume")
    assert not out.exists() and not (tmp_path / ".maps.lensmat-lock").exists()


def test_a_ctrl_c_that_lands_where_exceptions_are_ignored_is_raised_again_at_the_next_batch(monkeypatch):
    """An interrupt raised inside a __del__ is printed and dropped by Python; catch_interrupts remembers
    it, and collect raises it again before its next batch (so a fit never runs on after Ctrl-C)."""
    import signal

    from lensmat import outputs

    monkeypatch.setattr(outputs, "_interrupted", False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        outputs.catch_interrupts()
        with pytest.raises(KeyboardInterrupt):  # as usual
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        model = make_tiny_model()
        with pytest.raises(KeyboardInterrupt):  # the loop's safe point raises it again
            collect(model, random_token_batches(2, 2, 6, 40), [resid_hooks(3)], progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_python_api_refuses_impossible_settings_too():
    from lensmat.analyses.early_exit import layers_saved
    from lensmat.analyses.saturation import order_test
    from lensmat.lenses.tuned import TunedLensTraining, train_tuned_lens

    model = make_tiny_model()
    stats = collect(model, random_token_batches(2, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    with pytest.raises(ValueError, match="finite ridge >= 0"):
        fit_layer_maps(stats, ridge=-1.0)
    with pytest.raises(ValueError, match="tokens=-1 .*lr=nan"):
        TunedLensTraining(tokens=-1, lr=float("nan"))
    with pytest.raises(ValueError, match="trained on 0 tokens is the logit lens"):
        train_tuned_lens(model, [[0, 1, 2]], TunedLensTraining(tokens=0))
    with pytest.raises(ValueError, match="retention"):
        layers_saved([{"mean_layers": 3, "precision@1": 1.0}], 3, retention=1.5)
    with pytest.raises(ValueError, match="at least 1 shuffle"):
        order_test(torch.tensor([[1, 2, 3]] * 4), 5, n_permutations=-5)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        collect(model, random_token_batches(1, 2, 5, 40), [resid_hooks(3)], checkpoint="unused", checkpoint_every=0,
                progress=False)
