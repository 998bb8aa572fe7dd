"""Felix's import graph has no cycle: between its top-level modules and packages, and between its modules.

Every ``import`` of a Felix module counts, at the top of a file and inside functions alike (a function-level import
hides a cycle from Python's import machinery, not from the design). Read from the source with ``ast``, nothing is
imported. kernels/ is read as felix.ops.kernels, the name it installs under.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source_modules() -> dict[str, Path]:
    """{module name: file} for felix/ (felix.ops.kernels as kernels/, whether or not the link exists)."""
    files = {}
    for path in sorted((ROOT / "felix").rglob("*.py")):
        rel = path.relative_to(ROOT / "felix")
        if rel.parts[:2] == ("ops", "kernels"):
            continue
        files[".".join(("felix", *rel.with_suffix("").parts)).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[f"felix.ops.kernels.{path.stem}".removesuffix(".__init__")] = path
    return files


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The Felix modules `module` (in `path`) imports anywhere in the file; ``from P import X`` counts as P.X when
    that is a module, else as P."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            subs = [f"{parent}.{a.name}" for a in node.names]
            out.update(s for s in subs if s in known)
            if any(s not in known for s in subs):
                out.add(parent)
    resolved = set()
    for name in out:
        while name and name not in known:  # `import felix.ops.loss` -> the deepest module that exists
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.add(name)
    return resolved


def import_graph(level: str) -> dict[str, set[str]]:
    """{importer: imported} between modules (`level` "module") or top-level units (`level` "top": felix itself,
    felix.<module>, felix.<package> with everything in it)."""
    files = source_modules()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        for target in imported_modules(path, module, known):
            a, b = (module, target) if level == "module" else (_top(module), _top(target))
            if a != b:
                graph.setdefault(a, set()).add(b)
    return graph


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}) == ["a2", "b", "a2"]


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph("module")
    assert "felix.tasks.records" in graph["felix.data.corpus"]                 # top of the file
    assert "felix.ops.kernels.lowrank" in graph["felix.ops.kernels.spoke"]      # relative (from .lowrank import gemm)
    assert "felix.ops.kernels.attention" in graph["felix.ops.attention"]    # inside a function (Triton stays lazy)


@pytest.mark.parametrize("level", ["top", "module"])
def test_no_import_cycle(level):
    cycle = find_cycle(import_graph(level))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The stages, lowest first: a module may import its own stage and the ones before it, never one after it (the
# pipeline reads bottom-up: ops -> model -> data -> train -> ship -> verify). felix.testing (test and benchmark
# infrastructure) may import any stage and no stage imports it; felix/__init__.py (the public API) and
# felix/__main__.py stand outside the stages and nothing inside a stage below the CLI imports them.
STAGES = ("core", "ops", "model", "tasks", "data", "train", "ship", "verify", "tools", "cli")
OUTSIDE = {"felix": None, "felix.__main__": None, "felix.testing": len(STAGES), "felix._C": 1, "felix._C_gpu": 1}


def stage_of(unit: str) -> int | None:
    """The stage index of a top-level unit (felix.<package>), None for the package facade felix / felix.__main__."""
    if unit in OUTSIDE:
        return OUTSIDE[unit]
    name = unit.split(".")[1]
    assert name in STAGES, f"{unit} is in no stage: add it to a stage package (tests/test_import_graph.py STAGES)"
    return STAGES.index(name)


def test_felix_has_a_package_per_stage_and_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "felix").iterdir() if not p.name.startswith(("_C", ".", "__pycache__")))
    assert len(top) <= 13, top  # the stages, testing, __init__.py, __main__.py
    for unit in import_graph("top"):
        stage_of(unit)


def test_no_stage_imports_a_later_stage_or_the_facade():
    wrong = []
    for importer, targets in import_graph("top").items():
        for target in targets:
            if importer in ("felix", "felix.__main__", "felix.cli"):  # the facade; the CLI may use the public API
                continue
            if target in ("felix", "felix.__main__"):
                wrong.append(f"{importer} imports the package facade {target} (import the stage module instead)")
            elif importer == "felix.testing":
                continue
            elif target == "felix.testing":
                wrong.append(f"{importer} imports the test infrastructure felix.testing")
            elif stage_of(target) > stage_of(importer):
                wrong.append(f"{importer} (stage {stage_of(importer)}) imports {target} (stage {stage_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_tests_mirror_the_stages():
    """tests/<folder>/ are stage names, and pytest's pythonpath lists each (a test run alone finds the helpers it
    shares with another stage's tests)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    folders = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name.isidentifier()
                     and any(p.glob("test_*.py")))
    assert folders and set(folders) <= set(STAGES), folders
    pythonpath = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"]
    assert set(pythonpath) == {"tests", *(f"tests/{f}" for f in folders)}, pythonpath
