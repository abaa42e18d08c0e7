from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.report import build_report
from bitsweep.report.figures import group_key, group_label
from bitsweep.sweep.grid import expand_grid
from bitsweep.sweep.results import make_header
from bitsweep.sweep.runner import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
from sweep_fakes import FakeFactory, fake_metrics  # noqa: E402

CHROMIUM = next(
    (
        p
        for p in (
            "/usr/bin/chromium",
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p and Path(p).exists()
    ),
    None,
)


def _sweep(tmp_path: Path) -> Path:
    cells = expand_grid(
        {"weight_bits": [1, 2, 4, 8], "activation_bits": [2, 8], "granularity": ["per_channel", "per_tensor"]}
    )
    header = make_header(
        {"checkpoint": "/runs/fm/best.pt", "dataset": "fashion_mnist"},
        environment={"torch": "9.9.9-marker", "python": "3.11"},
        max_drop=1.0,
    )
    path = tmp_path / "sweep" / "results.jsonl"
    run_sweep(cells, FakeFactory(), path, header, progress=False)
    return path


def test_report_from_results_file_alone(tmp_path: Path) -> None:
    results = _sweep(tmp_path)
    # move the results file somewhere else: nothing but the file is needed
    lone = tmp_path / "elsewhere" / "results.jsonl"
    lone.parent.mkdir()
    shutil.copy(results, lone)
    paths = build_report(lone, tmp_path / "out")
    md = paths.markdown.read_text()
    page = paths.html.read_text()
    rec = paths.recommendation
    assert rec is not None and rec.found
    # fake metrics: per_channel W8 loses 20/2**7 = 0.156 points on A8; W4A8 loses 5.16 points
    assert rec.row["label"] == "W8A8 per_channel minmax"
    assert rec.drop == pytest.approx(
        90.0 - fake_metrics(expand_grid({"weight_bits": [8], "activation_bits": [8]})[1])["val_top1"]
    )
    for text in (md, page):
        assert "W8A8 per_channel minmax" in text
        assert "9.9.9-marker" in text  # environment recorded at sweep time
        assert "Model compression ratio" in text and "Final model size" in text
    # every cell in the table: 1 baseline + 4 x 2 x 2 quantized
    assert page.count("<tr") >= 17 + 2
    assert md.count("| W") >= 16
    for name in ("heatmap", "pareto"):
        for ext in ("png", "svg"):
            f = tmp_path / "out" / "figures" / f"{name}.{ext}"
            assert f.stat().st_size > 1000
        assert (tmp_path / "out" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # self-contained: no external resources, images embedded
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count('src="data:image/png;base64,') == 2


def test_report_refuses_non_results(tmp_path: Path) -> None:
    with pytest.raises(BitsweepError, match="not found"):
        build_report(tmp_path / "nope.jsonl")
    bad = tmp_path / "r.jsonl"
    bad.write_text("not json at all\n")
    with pytest.raises(BitsweepError):
        build_report(bad)


def test_report_of_partial_sweep_without_baseline(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    cells = expand_grid({"weight_bits": [4], "activation_bits": [8]}, include_baseline=False)
    run_sweep(cells, FakeFactory(), path, make_header({"checkpoint": "c", "dataset": "d"}), progress=False)
    paths = build_report(path)
    assert paths.recommendation is None
    assert "FP32 baseline has not been evaluated" in paths.markdown.read_text()


@pytest.mark.slow  # starts Chromium
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed (CI installs Debian's chromium package)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    paths = build_report(_sweep(tmp_path), tmp_path / "out")
    # A copy with a probe script records each image's load state on <body> once the page has loaded.
    probe = tmp_path / "probe.html"
    probe.write_text(
        paths.html.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
            "Array.from(document.images).map(i => i.complete + ':' + i.naturalWidth).join(',')); });</script></body>",
        )
    )
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'data-images="([^"]*)"', out.stdout)
    assert m, "the page's load event never fired"
    states = m.group(1).split(",")
    assert len(states) == 2
    for state in states:
        complete, width = state.split(":")
        assert complete == "true" and int(width) > 0, states
    assert "W8A8 per_channel minmax" in out.stdout


def test_report_names_no_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "sweep" / "results.jsonl"
    header = make_header({"checkpoint_sha256": "abc", "dataset": "fashion_mnist", "model": "mobilenetv2", "width": 0.5},
                         checkpoint="/home/someone/runs/fm-mbv2/best.pt")  # fmt: skip
    run_sweep(expand_grid({"weight_bits": [8], "activation_bits": [8]}), FakeFactory(), path, header, progress=False)
    for out in (None, tmp_path / "elsewhere"):  # beside the results file, and in another folder
        paths = build_report(path, out)
        for text in (paths.markdown.read_text(), paths.html.read_text()):
            assert "(fm-mbv2/best.pt)" in text
            assert "/home/someone" not in text and str(tmp_path) not in text
        assert '"results file": "results.jsonl"' in paths.markdown.read_text()


def test_rows_with_and_without_the_method_column_share_one_heatmap() -> None:
    old = {
        "weight_bits": 4,
        "activation_bits": 8,
        "granularity": "per_channel",
        "observer": "minmax",
        "symmetric": True,
    }
    new = {**old, "weight_bits": 8, "method": "rtn"}
    assert group_key(old) == group_key(new)
    assert group_label(group_key(new)) == "per_channel, minmax, symmetric"
    assert group_label(group_key({**new, "method": "adaround"})) == "per_channel, minmax, symmetric, adaround"
