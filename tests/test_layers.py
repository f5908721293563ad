"""The packages import downwards only, as the README's layer picture draws them, and no
frontend module can reach torch (or any other model package) through our imports.

Imports are read from the source with ``ast`` — module-level and function-level alike — and
followed transitively, so an import hidden in a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PICTURE_START = "<!-- layers"
HEAVY = frozenset({"torch", "transformers", "peft", "trl", "accelerate", "datasets", "gguf",
                   "sentencepiece", "sentence_transformers", "sklearn", "matplotlib", "numpy",
                   "bitsandbytes", "vllm", "llama_cpp"})
_PACKAGE_TOKEN = re.compile(r"(?<!\S)([a-z_]+)/(?=\s|$)")


def layers_from_readme(text: str) -> list[set[str]]:
    """The picture's packages, bottom layer first; packages on one line share a layer."""
    start = text.index(PICTURE_START)
    block = text[text.index("```", start) + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    rows = [set(_PACKAGE_TOKEN.findall(line)) for line in block.splitlines()]
    return [row for row in reversed(rows) if row]


def module_imports(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Every module of ``packages`` and the absolute module names it imports anywhere."""
    graph: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[name] = targets
    return graph


def upward_imports(graph: Mapping[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Imports of a package in the same or a higher layer than the importer's own."""
    rank = {package: i for i, layer in enumerate(layers) for package in layer}
    wrong = []
    for module, targets in graph.items():
        own = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other in rank and other != own and rank[other] >= rank[own]:
                wrong.append(f"{module} imports {target}")
    return wrong


def reachable(graph: Mapping[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start`` (ours and third-party), each with the module of
    ours that imports it first on the way."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for target in graph.get(module, ()):
            if target not in seen:
                seen[target] = module
                if target in graph:
                    todo.append(target)
    return seen


@pytest.fixture(scope="module")
def layers() -> list[set[str]]:
    return layers_from_readme((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def graph(layers: list[set[str]]) -> dict[str, set[str]]:
    return module_imports(ROOT, sorted(set().union(*layers)))


def test_the_picture_names_every_package(layers: list[set[str]]) -> None:
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert set().union(*layers) == ours
    assert layers[0] == {"base"} and layers[-1] == {"cli"}


def test_imports_run_downwards_only(graph: dict[str, set[str]],
                                    layers: list[set[str]]) -> None:
    assert upward_imports(graph, layers) == []


def test_no_frontend_module_reaches_a_model_package(graph: dict[str, set[str]]) -> None:
    frontends = [m for m in graph if m.split(".")[0] == "bots"]
    assert len(frontends) > 10
    for module in frontends:
        found = reachable(graph, module)
        heavy = sorted(t for t in found if t.split(".")[0] in HEAVY)
        assert not heavy, f"{module} reaches {heavy[0]} (imported by {found[heavy[0]]})"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """An upward import (even inside a function) and torch two hops away are both found."""
    for package in ("base", "persona", "engine", "bots"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "base" / "config.py").write_text("def f():\n    from engine import worker\n")
    (tmp_path / "engine" / "worker.py").write_text("import torch\n")
    (tmp_path / "persona" / "pack.py").write_text("from engine.worker import run\n")
    (tmp_path / "bots" / "core.py").write_text("from persona.pack import load\n")
    layers = [{"base"}, {"persona"}, {"engine", "bots"}]
    graph = module_imports(tmp_path, ["base", "persona", "engine", "bots"])
    assert upward_imports(graph, layers) == [
        "base.config imports engine", "base.config imports engine.worker",
        "persona.pack imports engine.worker", "persona.pack imports engine.worker.run"]
    assert "torch" in reachable(graph, "bots.core")
