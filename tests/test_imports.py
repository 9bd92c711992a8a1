"""The modules of domainlm import each other without cycles — counting imports inside functions too, so no
module reaches up into one that imports it (e.g. a stage calling back into the CLI that runs it) — and its packages
stack: no package-level cycle, and no import hidden inside a function except of an optional or heavy third-party
library (issue 20)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"


# Imports allowed inside a function body: optional extras (ray, lm-eval, peft: `pip install domainlm[...]`), the
# Slurm executor (datatrove's, only with prepare.executor: slurm), matplotlib (charts only), and the hub readers
# (datasets/pyarrow, only for `hf:` sources). Each such import says why in a comment on its line or the one above.
OPTIONAL = ("ray", "lm_eval", "peft", "matplotlib", "datasets", "pyarrow", "datatrove.executor.slurm",
            "domainlm.launch.slurm_executor")


def _lazy_target(node: ast.AST) -> str | None:
    """``lazy("domainlm.x")`` (domainlm/lazy.py): a module the CLI declares at its top and loads on first use."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def import_graph(src: Path) -> dict[str, set[str]]:
    """module → the domainlm modules it imports (a name imported from a module counts as that module; a
    ``lazy("...")`` declaration counts as an import)."""
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif _lazy_target(node):
                names = [_lazy_target(node)]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def test_no_import_cycles():
    graph = import_graph(SRC)
    assert "domainlm.train.loop" in graph and "domainlm.rundir" in graph["domainlm.train.loop"]
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle: {' → '.join(e.args[1])}")


def test_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    with pytest.raises(CycleError):
        tuple(TopologicalSorter(import_graph(tmp_path)).static_order())


def package_of(mod: str) -> str:
    """``domainlm.train.loop`` → ``train``; a top-level module is its own node (``domainlm.rundir`` → ``rundir``)."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_packages_stack():
    """The package graph is a DAG: the layers of docs/architecture.md hold (shape below objectives below config
    below model below train below plan; data below tokenizer below tokenize; the CLI on top)."""
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph(SRC).items():
        graph.setdefault(package_of(mod), set()).update(package_of(d) for d in deps if package_of(d) != package_of(mod))
    graph.pop("domainlm", None)  # the package itself (its __init__ holds only the version)
    for deps in graph.values():
        deps.discard("domainlm")
    assert {"train", "plan", "model", "config"} <= graph.keys()
    try:
        order = tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"package cycle: {' → '.join(e.args[1])}")
    assert order.index("model") < order.index("train") < order.index("plan") < order.index("cli")
    assert order.index("shape") < order.index("model") and order.index("data") < order.index("tokenizer")


def function_imports(src: Path) -> list[str]:
    """Every import statement inside a function body that is not of an ``OPTIONAL`` module: "file:line module"."""
    found = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                if not all(any(n == o or n.startswith(o + ".") for o in OPTIONAL) for n in names):
                    found.append(f"{path.relative_to(src)}:{node.lineno} {', '.join(names)}")
    return found


def test_no_imports_inside_functions_but_optional_ones():
    assert function_imports(SRC) == []


def test_function_imports_are_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    import json\n    import ray\n    from matplotlib import pyplot\n")
    assert function_imports(tmp_path) == ["pkg/a.py:2 json"]
