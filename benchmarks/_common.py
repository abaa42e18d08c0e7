"""Shared helpers for benchmark scripts: machine description and BENCHMARKS.md sections.

Each benchmark owns one section of BENCHMARKS.md between markers
``<!-- BEGIN name -->`` and ``<!-- END name -->`` and rewrites only that
section, so benchmarks can be rerun one at a time without touching the rest.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
WORK = ROOT / "benchmarks" / "work"  # checkpoints and scratch files (git-ignored)


def machine() -> str:
    """One line naming the machine, OS, Python and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = "CPU only"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return (
        f"{cpu}, {os.cpu_count()} cores, {dev}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def avx2_emulated() -> bool:
    """Whether this process runs as an AVX2-only CPU would: oneDNN limited by ``ONEDNN_MAX_CPU_ISA=AVX2`` and
    ATen/Inductor by ``ATEN_CPU_CAPABILITY=avx2`` (same kernels and instructions; another microarchitecture)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"
            and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2")  # fmt: skip


def int8_instructions() -> str:
    """The CPU's int8 dot-product instructions, as the int8 kernels see them: AMX, AVX-512 VNNI, AVX-VNNI or none."""
    flags = _cpu_flags()
    found = [name for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
             if flag in flags]  # fmt: skip
    if avx2_emulated():
        return (f"none: AVX2 only, set by ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 on a CPU that has "
                f"{', '.join(found) or 'no int8 dot products'}")  # fmt: skip
    return ", ".join(found) or ("none (AVX2 only)" if "avx2" in flags else "none")


def machine_key() -> str:
    """A short name for the kind of machine, to keep one benchmark section per kind (e.g. ``amd-epyc-vnni``)."""
    cpu = machine().split(",")[0].lower()
    vendor = "intel-xeon" if "xeon" in cpu else "amd-epyc" if "epyc" in cpu else re.sub(r"[^a-z0-9]+", "-", cpu)[:24]
    flags = _cpu_flags()
    isa = "amx" if "amx_int8" in flags else "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "avx2"
    return f"{vendor}-{isa}" + ("-as-avx2" if avx2_emulated() and isa != "avx2" else "")


def header(command: str) -> str:
    """The lines every section starts with: command, date, machine."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if avx2_emulated():
        command = f"ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 {command}"
    return f"Command: `{command}`  \nDate: {date}  \nMachine: {machine()}; int8 instructions: {int8_instructions()}\n"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD, beside: str | None = None) -> None:
    """Replace the section ``name`` of BENCHMARKS.md with ``markdown``, or add it.

    A new section goes after the last section whose name starts with ``beside`` (so the
    per-CPU-kind sections of one benchmark stay together), else at the end.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    siblings = list(re.finditer(r"<!-- END " + re.escape(beside) + r"[^ ]* -->", text)) if beside else []
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif siblings:
        at = siblings[-1].end()
        text = text[:at] + "\n" + block + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)
