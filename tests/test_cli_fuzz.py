"""A hypothesis fuzz test of the ``lensmat`` command line (issue 28 item 8): option values drawn from
the awkward ones (negative, zero, NaN, inf, huge, empty, odd paths) on every command, on a tiny model
and corpus. Every case must end with exit code 0, 1 or 2, print no traceback, and change nothing
outside its ``--out`` (the rest of the scratch tree is hashed before and after)."""

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensmat import cli

pytestmark = pytest.mark.slow

NASTY = ["-5", "0", "0.5", "nan", "inf", "-inf", "1e400", "99999999999999999999", "", " ", "abc", "-0"]
VALID = ["1", "2", "3", "7", "64"]
BAD_PATHS = ["notes.txt", "notes.txt/sub", "thesis", ".", "", "out/../thesis", "link_loop"]
VALUES = st.one_of(st.sampled_from(VALID), st.sampled_from(NASTY))  # half valid, so runs get past parsing too
PATHS = st.one_of(st.sampled_from(["out", "missing/deeper/out"]), st.sampled_from(BAD_PATHS))
NUMERIC = {  # the numeric options of each command (every one parsed by a shared type in lensmat.cli)
    "info": ["--max-length", "--random-init"],
    "fit": ["--batch-size", "--max-fit-tokens", "--ridge", "--checkpoint-every", "--max-length", "--memory-limit",
            "--n-mask", "--position-seed"],
    "compare": ["--batch-size", "--max-fit-tokens", "--max-eval-tokens", "--jlens-prompts", "--tuned-lr", "--max-length",
                "--memory-limit"],
    "submodules": ["--batch-size", "--max-fit-tokens", "--max-eval-tokens", "--n-mask", "--mask-seed"],
    "linearity": ["--batch-size", "--max-fit-tokens", "--max-eval-tokens", "--max-k"],
    "saturation": ["--k", "--max-fit-tokens", "--max-eval-tokens", "--permutations", "--pairs"],
    "early-exit": ["--retention", "--max-fit-tokens", "--max-eval-tokens", "--max-probe-tokens", "--masked-t"],
    "trajectory": ["--k", "--max-fit-tokens", "--max-length", "--batch-size"],
    "intervene": ["--k", "--tol", "--scale", "--generate", "--steer", "--max-fit-tokens", "--batch-size"],
    "attribute": ["--top", "--position", "--token-id", "--max-fit-tokens", "--batch-size"],
}
BUDGETS = {"fit": ["--max-fit-tokens", "300"], "compare": ["--max-fit-tokens", "300", "--max-eval-tokens", "100"],
           "submodules": ["--max-fit-tokens", "300", "--max-eval-tokens", "60", "--kinds", "attn"],
           "linearity": ["--max-fit-tokens", "300", "--max-eval-tokens", "60"],
           "saturation": ["--max-eval-tokens", "100", "--permutations", "20", "--pairs", "4"],
           "early-exit": ["--max-fit-tokens", "300", "--max-eval-tokens", "100", "--max-probe-tokens", "100"],
           "trajectory": ["--text", "w1 w4 w7 w10", "--max-fit-tokens", "300"],
           "intervene": ["--text", "w1 w4 w7 w10", "--ablate", "attn@1", "--max-fit-tokens", "300"],
           "attribute": ["--text", "w1 w4 w7 w10", "--lenses", "logit", "--top", "1", "--max-fit-tokens", "300"],
           "info": []}
CASES = []


def snapshot(root: Path) -> dict[Path, str]:
    """Every path under ``root`` (relative) with its content's hash (``dir`` for folders and links)."""
    return {path.relative_to(root): hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file() and not path.is_symlink() else "dir" for path in root.rglob("*")}


def assert_nothing_changed_outside(root: Path, out: str, before: dict, owned_before: bool, argv) -> None:
    """What existed is unchanged (inside ``out`` too, unless lensmat had written it), and what is new is
    ``out`` itself, inside it, or a folder above it."""
    after = snapshot(root)
    target = Path(os.path.normpath(out)) if out.strip() else None

    def in_out(rel: Path) -> bool:
        return target is not None and (rel == target or target in rel.parents)

    changed = [rel for rel, h in before.items() if after.get(rel) != h and not (owned_before and in_out(rel))]
    new = [rel for rel in set(after) - set(before) if not (in_out(rel) or (target is not None and rel in target.parents))]
    assert not changed and not new, (argv, changed, new)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "notes.txt").write_text("the user's notes\n")
    (root / "thesis").mkdir()
    (root / "thesis" / "chapter1.tex").write_text("\\chapter{One}\n")
    os.symlink(root / "link_loop", root / "link_loop")
    return root, tiny_gpt2[1], tiny_gpt2[2]


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_cli_fuzz(scratch, command, data, capsys, monkeypatch):
    root, model_folder, corpus = scratch
    monkeypatch.chdir(root)
    argv = [command, "--model", str(model_folder), "--dataset", str(corpus)]
    if command != "info":
        argv += ["--quiet", *BUDGETS[command]]
        out = data.draw(PATHS, label="out")
        argv += ["--out", out] + (["--force"] if data.draw(st.booleans(), label="force") else [])
    else:
        out = ""
    for option in data.draw(st.lists(st.sampled_from(NUMERIC[command]), max_size=3, unique=True), label="options"):
        argv += [option, data.draw(VALUES, label=option)]
    before = snapshot(root)
    owned_before = bool(out.strip()) and (root / out / ".lensmat-output.json").is_file()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    CASES.append((argv, code, err.strip().splitlines()[-1] if err.strip() else ""))
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert_nothing_changed_outside(root, out, before, owned_before, argv)


def test_fuzz_ran_and_reports_its_count():
    """Prints how many cases the fuzz test ran and how they ended (pytest -s shows it)."""
    if not CASES:
        pytest.skip("test_cli_fuzz did not run in this session")
    import collections
    import re

    codes = {c: sum(1 for _, code, _ in CASES if code == c) for c in (0, 1, 2)}
    print(f"\nlensmat CLI fuzz: {len(CASES)} cases, exit 0: {codes[0]}, 1: {codes[1]}, 2: {codes[2]}")
    kinds = collections.Counter(re.sub(r"'[^']*'|/\\S+|\\d+", "_", last)[:110] for _, code, last in CASES if code)
    for message, count in kinds.most_common():
        print(f"  {count:>4}  {message}")
    assert sum(codes.values()) == len(CASES)
