from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitsweep.artifacts import PackedMeta, read_header, save_packed
from bitsweep.cli import main
from bitsweep.errors import BitsweepError
from bitsweep.models import create_model
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.bitpack import packed_nbytes
from bitsweep.report import build_report
from bitsweep.report.figures import group_key, group_label
from bitsweep.report.search import packed_breakdown
from bitsweep.search import LayerBits, layer_names
from bitsweep.sweep.grid import expand_grid, plan_cell
from bitsweep.sweep.results import make_header, read_results
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


# The mixed-precision section: a real packed file of a tiny model quantized with a per-layer plan, a search.json
# beside it as 'bitsweep search' writes one, and a fake sweep of the same FP32 size.


def _search_dir(folder: Path, arch, *, fp32_bytes: int = 32007, finetune: bool = True) -> Path:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
    names = layer_names(model)
    plan = LayerBits.explicit({n: (2, 4, 8)[i % 3] for i, n in enumerate(names.weights)})
    config = plan.to_quant_config(QuantConfig.from_bits(8, 8))
    g = torch.Generator().manual_seed(0)
    model = ptq(model, config, [torch.randn(8, 1, 8, 8, generator=g)]).model
    folder.mkdir(parents=True)
    packed = save_packed(model, folder / "model.safetensors", PackedMeta(arch, config))
    record = {"checkpoint": "runs/x/best.pt", "layer_bits": plan.to_dict(), "file_bytes": packed.file_bytes,
              "packed_file": "somewhere/else/model.safetensors", "fp32_bytes": fp32_bytes, "max_bytes": 9000,
              "max_drop": None, "max_ratio": None, "val_top1": 70.0, "test_top1": 69.5, "val_images": 64,
              "test_images": 64, "simulation": "integer-exact"}  # fmt: skip
    if finetune:
        record["finetune"] = {"run_dir": str(folder / "qat"), "epochs": 1, "val_top1": 86.0, "test_top1": 85.5,
                              "simulation": "integer-exact", "file_bytes": packed.file_bytes - 8}  # fmt: skip
    (folder / "search.json").write_text(json.dumps(record))
    return folder


def _md_rows(md: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first header is ``first_header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_with_a_search_shows_the_front_and_each_layers_bytes(tmp_path: Path, arch) -> None:
    results = _sweep(tmp_path)
    search = _search_dir(tmp_path / "search-a", arch)
    paths = build_report(results, tmp_path / "out", searches=[search])
    assert paths.search is not None and paths.search.metric == "test"
    for name in ("mixed_front", "layer_bytes-search-a"):
        for ext in ("png", "svg"):
            assert (tmp_path / "out" / "figures" / f"{name}.{ext}").stat().st_size > 1000
        assert (tmp_path / "out" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md, page = paths.markdown.read_text(), paths.html.read_text()
    assert "## Mixed precision (per-layer search)" in md and "search-a + QAT (1 epoch)" in md
    assert page.count('src="data:image/png;base64,') == 4 and not re.search(r'(src|href)="(?!data:)', page)

    # One row per weight layer with the plan's bits; integers, scales, biases as the file stores them.
    header, n = read_header(search / "model.safetensors")
    plan = LayerBits.from_dict(json.loads((search / "search.json").read_text())["layer_bits"])
    rows = _md_rows(md, "layer")
    layers, rest, total = rows[:-4], rows[-4:-1], rows[-1]
    assert [r[0] for r in layers] == [entry[0] for entry in header["weight_layers"]]  # model order

    def num(cell: str) -> int:
        return int(cell.replace(",", ""))

    for r, (name, _, shape, has_bias, n_scales) in zip(layers, header["weight_layers"], strict=True):
        bits = plan.weight_bits_of(name)
        assert num(r[2]) == bits and num(r[3]) == packed_nbytes(math.prod(shape), bits)
        assert num(r[4]) == 4 * n_scales and num(r[6]) == (4 * shape[0] if has_bias else 0)
        assert num(r[7]) == num(r[4]) + num(r[5]) + num(r[6]) and num(r[8]) == num(r[3]) + num(r[7])
    tensors = load_file(str(search / "model.safetensors"))
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    assert sum(num(r[3]) for r in layers) == nbytes["weights.packed"]
    assert sum(num(r[4]) for r in layers) == nbytes["weights.scale"]
    payload = (search / "model.safetensors").stat().st_size - n
    assert sum(num(r[8]) for r in layers) + num(rest[0][8]) + num(rest[1][8]) == payload == sum(nbytes.values())
    assert num(rest[2][8]) == n and num(total[8]) == (search / "model.safetensors").stat().st_size
    # The points: the plan and its fine-tuning, each against the best uniform cell no larger.
    points = _md_rows(md, "model")
    assert [p[0] for p in points] == ["search-a", "search-a + QAT (1 epoch)"] and points[0][6] == "69.50"


def test_layer_bytes_follow_the_files_element_widths(tmp_path: Path, arch) -> None:
    """float16 scales and biases (a file written that way) count 2 bytes each: widths come from the header."""
    search = _search_dir(tmp_path / "s", arch)
    wide = packed_breakdown(search / "model.safetensors")
    tensors = load_file(str(search / "model.safetensors"))
    for key in ("weights.scale", "biases"):
        tensors[key] = tensors[key].half()
    meta = safe_open(str(search / "model.safetensors"), "pt").metadata()
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=meta)
    half = packed_breakdown(tmp_path / "half.safetensors")
    assert half.dtypes["weights.scale"] == "F16" and half.dtypes["activations.scale"] == "F32"
    for a, b in zip(wide.layers, half.layers, strict=True):
        assert (b.integer_bytes, 2 * b.scale_bytes, 2 * b.bias_bytes) == (a.integer_bytes, a.scale_bytes, a.bias_bytes)
    assert sum(ly.total_bytes for ly in half.layers) + half.activation_bytes + half.float_bytes == half.payload_bytes


def test_several_searches_form_a_front_and_bad_searches_are_refused(
    tmp_path: Path, arch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _sweep(tmp_path)
    a = _search_dir(tmp_path / "a" / "search", arch)
    b = _search_dir(tmp_path / "b" / "search", arch, finetune=False)
    (b / "model.safetensors").unlink()  # moved away: the point stays, the per-layer part says why it is missing
    assert main(["report", str(results), "--output", str(tmp_path / "out"), "--search", str(a), "--search",
                 str(b / "search.json"), "--search-metric", "val"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "b/search: its packed file" in out and "optimistic" in out
    md = (tmp_path / "out" / "report.md").read_text()
    assert [p[0] for p in _md_rows(md, "model")] == ["a/search", "a/search + QAT (1 epoch)", "b/search"]
    assert (tmp_path / "out" / "figures" / "layer_bytes-a-search.png").is_file()
    assert not (tmp_path / "out" / "figures" / "layer_bytes-b-search.png").exists()
    other = _search_dir(tmp_path / "other", arch, fp32_bytes=99)
    with pytest.raises(BitsweepError, match="searched another model"):
        build_report(results, tmp_path / "out2", searches=[other])
    with pytest.raises(BitsweepError, match="no search.json"):
        build_report(results, tmp_path / "out2", searches=[tmp_path])


def test_a_per_layer_cell_is_in_the_tables_but_not_the_heatmap(tmp_path: Path) -> None:
    class Plan:
        weight_bits, activation_bits, weights, activations = 8, 8, {"fc": 2}, {}

    cells = [*expand_grid({"weight_bits": [2, 8], "activation_bits": [8]}), plan_cell(tmp_path / "plan.yaml", Plan())]
    path = tmp_path / "results.jsonl"
    run_sweep(cells, FakeFactory(), path, make_header({"checkpoint": "c", "dataset": "d"}), progress=False)
    md = build_report(path).markdown.read_text()
    assert f"mixed per_channel minmax from {tmp_path.name}/plan.yaml" in md
    assert group_label(group_key(read_results(path).rows[-1])) == (
        f"per_channel, minmax, symmetric, from {tmp_path.name}/plan.yaml"
    )


def test_cells_that_stopped_early_show_their_image_counts_and_a_note(tmp_path: Path) -> None:
    results = _sweep(tmp_path)
    lines = results.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for r in rows[1:]:
        r.update(images_val=5000, images_test=10000, stopped_early=False)
        if r.get("weight_bits") == 1:
            r.update(images_val=1000, images_test=1000, stopped_early=True)
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = build_report(results, tmp_path / "out").markdown.read_text()
    every = md[md.index("## Every cell") :].splitlines()[2:]
    header, *table = ([c.strip() for c in line.strip("|").split("|")] for line in every if line.startswith("|"))
    table = [r for r in table if not set(r[0]) <= {"-"}]  # the header rule
    stopped = [r for r in table if r[0].startswith("W1")]
    assert len(stopped) == 4 and all(r[header.index("val images")] == "1,000" for r in stopped)
    assert all(r[header.index("test images")] == "10,000" for r in table if not r[0].startswith("W1"))
    assert "4 cell(s) stopped early (W1A2 per_channel minmax" in md and "--full-eval" in md
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(json.dumps({**r, "stopped_early": False}) for r in rows) + "\n")
    assert "stopped early" not in build_report(clean, tmp_path / "out2").markdown.read_text()
