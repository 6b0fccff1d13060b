"""report.html (issue 32): one self-contained offline page per run folder, checked as files (fast) and
as a person sees it, in headless Chromium (Debian's ``chromium``, driven by Playwright; installed by
``.ci/run``; skipped with the install line elsewhere when missing): no console errors, the numbers
shown for a layer equal report.json's, clicking a trajectory cell shows that cell's top-k, pinning a
token draws its rank, and a screenshot is not blank. The real-model test writes the README's
screenshot (``LENSMAT_UPDATE_SCREENSHOT=1``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import lensmat
from conftest import load_named_model, strict_json
from test_results import report_calls
from lensmat.cli import main
from lensmat.outputs import MANIFEST, foreign_entries
from lensmat.reports.html import FILE, packed_plotly_js

TINY = dict(max_length=32, progress=False)
CHROMIUM = "/usr/bin/chromium"
README_SHOT = Path(__file__).parents[1] / "docs" / "images" / "report-smollm2.png"


@pytest.fixture(scope="module")
def compare_run(tiny_gpt2, tmp_path_factory):
    model, _, corpus = tiny_gpt2
    out = tmp_path_factory.mktemp("html") / "compare"
    report = lensmat.compare(model, str(corpus), lenses="logit,mat", sites="post,mid", max_fit_tokens=800,
                             max_eval_tokens=300, out=out, **TINY)
    return report, out


def embedded(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="lensmat-data">(.*?)</script>', html, re.S)
    assert found, "the page embeds its data"
    return json.loads(found.group(1))


def test_the_page_is_one_offline_file_holding_the_run(compare_run):
    report, out = compare_run
    html = (out / FILE).read_text(encoding="utf-8")
    assert packed_plotly_js() in html, "plotly.js is inlined"
    own = html.replace(packed_plotly_js(), "")
    assert "<script src" not in own and "<link" not in own, "nothing is loaded from elsewhere"
    assert not re.search(r"(src|href)=[\"']https?://", own)
    data = embedded(html)
    assert data["command"] == "compare" and data["provenance"]["lensmat_version"] == lensmat.__version__
    on_disk = strict_json(out / "report.json")
    assert on_disk["provenance"]["command_line"], "report.json records how it was made"
    curve = next(c for c in data["curves"] if c["site"] == "post" and c["metric"] == "kl")
    mat = next(line for line in curve["lines"] if line["name"] == "mat")
    assert mat["y"] == on_disk["lenses"]["mat"]["kl"]
    assert mat["low"] == on_disk["lenses"]["mat"]["ci_low"]["kl"]
    views = strict_json(out / "views.json")["trajectories"]
    assert data["trajectories"] == views and len(views["lines"]) == 6 and views["k"] == 10
    assert {h["title"][:9] for h in data["heatmaps"]} == {"R² of mat", "R² of id "}
    assert not foreign_entries(out) and FILE in json.loads((out / MANIFEST).read_text())["files"]


def test_trajectory_view_ranks_match_the_top_k_and_an_independent_readout(compare_run, tiny_gpt2):
    """The candidates' ranks agree with the cell's own top-k (rank r = the r-th entry), and with the
    logit lens computed by hand (final norm + unembedding of run_with_cache's residuals)."""
    import torch

    model = tiny_gpt2[0]
    views = compare_run[0].views["trajectories"]
    line = views["lines"][0]
    for lens in range(len(views["lenses"])):
        for layer in range(views["n_layers"] + 1):
            for pos in range(len(line["tokens"])):
                for r, token in enumerate(line["top_ids"][lens][layer][pos]):
                    j = line["candidates"][pos].index(token)
                    assert line["candidate_ranks"][lens][layer][pos][j] <= r  # ties rank lower, never higher
    ids = torch.tensor([line["ids"]])
    _, cache = model.run_with_cache(ids)
    logit = views["lenses"].index("logit")
    for layer in (0, 2):
        h = cache[f"blocks.{layer}.hook_resid_pre"][0]
        logits = model.unembed(model.ln_final(h[None]))[0]
        for pos in (1, 4):
            for j, token in enumerate(line["candidates"][pos][:5]):
                want = int((logits[pos] > logits[pos, token]).sum())
                assert line["candidate_ranks"][logit][layer][pos][j] == want


def test_view_rebuilds_the_page_and_the_folder_stays_lensmats(compare_run, tmp_path, capsys):
    _, out = compare_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / FILE).unlink()
    (copy / "views.json").unlink()
    assert main(["view", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert str(copy / FILE) in printed and "MB" in printed
    data = embedded((copy / FILE).read_text(encoding="utf-8"))
    assert data["trajectories"] is None  # no views.json: the page says to run the command again
    assert not foreign_entries(copy)


def test_view_refuses_a_folder_without_a_report(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 1  # a file that is not there: the machine refused (OSError)
    assert "No report at" in capsys.readouterr().err


def test_every_command_writes_a_page(runs_every_command):
    for command, folder in runs_every_command.items():
        data = embedded((folder / FILE).read_text(encoding="utf-8"))
        assert data["command"] == command
        assert data["curves"] or data["heatmaps"] or data["trajectories"], command
    line = embedded((runs_every_command["trajectory"] / FILE).read_text(encoding="utf-8"))["trajectories"]["lines"]
    assert [view["text"] for view in line] == ["w1 w4 w7 w10"]


@pytest.fixture(scope="module")
def runs_every_command(tiny_gpt2, tmp_path_factory):
    model, _, corpus = tiny_gpt2
    root = tmp_path_factory.mktemp("pages")
    calls = {command: run for command, run in report_calls(model, corpus).items() if command != "compare"}
    calls["intervene"] = lambda out: lensmat.reports.intervene_report(model, "w1 w4 w7 w10", str(corpus), ablate="attn@1",
                                                                      max_fit_tokens=600, out=out, **TINY)
    calls["attribution"] = lambda out: lensmat.attribute(model, "logit,mat", "w1 w4 w7 w10", dataset=str(corpus), top=1,
                                                         max_fit_tokens=600, out=out, **TINY)
    for command, run in calls.items():
        run(root / command)
    return {command: root / command for command in calls}


def chromium_page():
    """A Playwright page in headless Debian Chromium, or a skip (a failure in CI) naming the install."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright (pip install playwright)"
    else:
        missing = None if Path(CHROMIUM).exists() else f"{CHROMIUM} (apt-get install -y chromium)"
    if missing:
        if os.environ.get("CI"):
            raise RuntimeError(f"The browser test needs {missing}; .ci/run installs it.")
        pytest.skip(f"needs {missing}")
    return sync_playwright


def open_page(playwright, path: Path, errors: list):
    """Headless Chromium on the page at ``path`` once it has drawn (``body[data-ready]``); errors collected."""
    browser, page = open_page_plain(playwright, path, errors)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    return browser, page


def open_page_plain(playwright, path: Path, errors: list):
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                        "--disable-background-networking", "--disable-component-update",
                                        "--disable-sync"])
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    return browser, page


def check_page(page, report: dict, views: dict, layer: int, screenshot: Path) -> None:
    """The layer table shows report.json's numbers at ``layer``; a trajectory click shows the cell's top-k;
    pinning draws a rank curve; the screenshot is not blank."""
    page.select_option("#layer-select", str(layer))
    for lens in ("logit", "mat"):
        for metric in ("precision@1", "kl"):
            cell = page.locator(f'#layer-table tr[data-site="post"][data-metric="{metric}"][data-lens="{lens}"] td.value')
            assert float(cell.inner_text()) == pytest.approx(report["lenses"][lens][metric][layer], rel=1e-3, abs=1e-9)
    line, lens_i, cell_layer, pos = 1, views["lenses"].index("mat"), 2, 3
    page.select_option("#traj-line", str(line))
    page.select_option("#traj-lens", str(lens_i))
    page.click(f'#traj-grid td[data-layer="{cell_layer}"][data-pos="{pos}"]')
    top = page.locator("#traj-top")
    assert top.get_attribute("data-layer") == str(cell_layer) and top.get_attribute("data-pos") == str(pos)
    shown = [int(t) for t in top.locator("tr[data-token]").evaluate_all("rows => rows.map(r => r.dataset.token)")]
    want = views["lines"][line]["top_ids"][lens_i][cell_layer][pos]
    assert shown == want and len(shown) == views["k"]
    probs = [float(p) for p in top.locator("td.prob").all_inner_texts()]
    assert probs == pytest.approx(views["lines"][line]["top_probs"][lens_i][cell_layer][pos], rel=1e-3)
    top.locator("button.pin").first.click()
    assert page.locator("#traj-pinned .scatterlayer .trace").count() == 1, "a pinned token draws its rank curve"
    page.screenshot(path=str(screenshot), full_page=True)
    from PIL import Image, ImageStat

    image = Image.open(screenshot).convert("L")
    assert image.size[1] > 900 and ImageStat.Stat(image).stddev[0] > 20, "the screenshot is not blank"


def test_the_page_in_a_real_browser(compare_run, tmp_path):
    sync_playwright = chromium_page()
    report, out = compare_run
    errors: list[str] = []
    with sync_playwright() as p:
        browser, page = open_page(p, out / FILE, errors)
        check_page(page, strict_json(out / "report.json"), strict_json(out / "views.json")["trajectories"], 2,
                   tmp_path / "shot.png")
        browser.close()
    assert errors == []


def test_every_page_opens_without_errors(runs_every_command):
    sync_playwright = chromium_page()
    errors: list[str] = []
    with sync_playwright() as p:
        for command, folder in runs_every_command.items():
            browser, page = open_page(p, folder / FILE, errors)
            assert page.locator("h1").inner_text().startswith(f"lensmat {command}")
            browser.close()
    assert errors == []


@pytest.mark.real_model
def test_the_smollm2_page_in_a_real_browser(tmp_path):
    """The page of a small compare run on SmolLM2-135M; writes the README's screenshot when asked."""
    sync_playwright = chromium_page()
    model = load_named_model("smollm2-135m")
    out = tmp_path / "smollm2"
    lensmat.compare(model, max_fit_tokens=3_000, max_eval_tokens=300, out=out, progress=False)
    size = (out / FILE).stat().st_size
    assert size < 12e6, f"report.html is {size / 1e6:.1f} MB"
    errors: list[str] = []
    with sync_playwright() as p:
        browser, page = open_page(p, out / FILE, errors)
        check_page(page, strict_json(out / "report.json"), strict_json(out / "views.json")["trajectories"], 15,
                   tmp_path / "shot.png")
        if os.environ.get("LENSMAT_UPDATE_SCREENSHOT"):  # the README's picture: the trajectory view, a cell clicked
            README_SHOT.parent.mkdir(exist_ok=True)
            page.locator("section", has=page.locator("#traj-grid")).screenshot(path=str(README_SHOT))
        browser.close()
    assert errors == []


def test_show_puts_the_page_inline_for_jupyter(compare_run, tmp_path):
    """``Report.show()`` (the tutorials' inline view) is the same page in an iframe, and it draws there."""
    from html import unescape

    from lensmat.reports.html import render

    report, _ = compare_run
    shown = report.show(height=600).data
    found = re.search(r'srcdoc="(.*?)" title=', shown, re.S)
    assert found and unescape(found.group(1)) == render(report) and "height:600px" in shown
    sync_playwright = chromium_page()
    (tmp_path / "notebook.html").write_text(f"<!DOCTYPE html><html><body>{shown}</body></html>", encoding="utf-8")
    errors: list[str] = []
    with sync_playwright() as p:
        browser, page = open_page_plain(p, tmp_path / "notebook.html", errors)
        frame = page.frame_locator("iframe")
        frame.locator("body[data-ready='1']").wait_for(timeout=60_000)
        assert frame.locator("#traj-grid td").count() > 0
        browser.close()
    assert errors == []
