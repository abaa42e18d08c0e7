"""The package layering of docs/ARCHITECTURE.md, checked on the source: no import of a later package, no cycle,
no private name taken from another package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bitsweep"
# Earlier packages never import later ones (top-level modules errors, io, config, runtime come first).
LAYERS = [
    "",
    "data",
    "models",
    "quant",
    "backend",
    "artifacts",
    "export",
    "measure",
    "training",
    "qat",
    "sweep",
    "search",
    "report",
    "cli",
]


def _package(module: str) -> str:
    """``bitsweep.quant.graph`` -> ``quant``; top-level modules (``bitsweep.io``) -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (SRC / parts[1]).is_dir()) else ""


def _imports() -> list[tuple[str, str, list[str], int]]:
    """(importing file's package, imported module, imported names, line) of every bitsweep import in src/."""
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        here = "cli" if rel.name == "__main__" else _package(".".join(rel.parts))  # python -m bitsweep runs the CLI
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitsweep"):
                found.append((here, node.module, [a.name for a in node.names], node.lineno, str(rel)))
            elif isinstance(node, ast.Import):
                found.extend(
                    (here, a.name, [], node.lineno, str(rel)) for a in node.names if a.name.startswith("bitsweep")
                )
    return found  # type: ignore[return-value]


def test_no_package_imports_a_later_one() -> None:
    wrong = []
    for here, module, _, line, where in _imports():  # type: ignore[misc]
        there = _package(module)
        if module != "bitsweep" and LAYERS.index(there) > LAYERS.index(here):
            wrong.append(f"{where}:{line} ({here or 'top level'}) imports {module} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_package() -> None:
    wrong = []
    for here, module, names, line, where in _imports():  # type: ignore[misc]
        if _package(module) != here:
            wrong.extend(
                f"{where}:{line} imports {module}.{n}" for n in names if n.startswith("_") and not n.endswith("__")
            )
    assert not wrong, "\n".join(wrong)


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS[1:])
