"""The package layout holds: no import circles, and each layer imports only what is below it.

Every `import` / `from ... import` in the project's own code counts, also the ones inside functions (a
lazy import is still a dependency, it only hides a circle until the function runs). Layers, lowest first:

    harness (the root: paths and the shipped-head resolver)
    harness.infra      errors, run store, locks, W&B tracking, the app shell
    harness.model      device, loading, quantization, chat templates
    harness.engine     the loop, target, tree, acceptance, sizing, timing, metrics, lossless
    harness.heads      draft-head base class, registry, checkpoints
    harness.data       questions, ShareGPT, training examples, token data, feature cache, distill backends
    baselines, methods the published methods and ours (methods may build on baselines)
    reports            tables and figures from run folders
    apps               harness/*.py: bench, train (+ medusa_cli, its Medusa flags), distill, plan, demo,
                       interleave, ship, latency

`harness.infra.tracking` mirrors run summaries to W&B and so reads the glossary (`harness.engine.metrics`,
`harness.engine.lossless`): the one listed exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness import REPO_ROOT

PACKAGES = ("harness", "baselines", "methods", "reports")
RANKS = {"harness": 0, "harness.infra": 1, "harness.model": 2, "harness.engine": 3, "harness.heads": 4,
         "harness.data": 5, "baselines": 6, "methods": 7, "reports": 8, "apps": 9}
EXCEPTIONS = {("harness.infra.tracking", "harness.engine.metrics"), ("harness.infra.tracking", "harness.engine.lossless")}


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules `name` imports (a `from package import module` counts as the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:      # `import harness.engine.loop.X` -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer(name: str) -> str:
    if name.startswith("harness."):
        parts = name.split(".")
        package = ".".join(parts[:2])
        return package if package in RANKS else "apps"
    return name.split(".")[0]


def test_the_layout_is_the_documented_one():
    assert {layer(name) for name in MODULES} == set(RANKS)
    apps = sorted(name for name in MODULES if layer(name) == "apps")
    assert apps == ["harness.bench", "harness.demo", "harness.distill", "harness.interleave", "harness.latency",
                    "harness.medusa_cli", "harness.plan", "harness.ship", "harness.train"]


def test_no_import_circles():
    """Depth-first search over every import; a back edge is a circle, printed as the chain of modules."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_each_layer_imports_only_what_is_below_it():
    upward = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                    if RANKS[layer(target)] > RANKS[layer(name)] and (name, target) not in EXCEPTIONS)
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["harness.engine", "harness.model", "harness.infra"])
def test_the_engine_and_below_import_no_method_report_or_app(package):
    reached = {target for name, targets in GRAPH.items() if layer(name) == package for target in targets}
    assert not {target for target in reached if layer(target) in ("baselines", "methods", "reports", "apps")}


def test_the_graph_sees_lazy_and_relative_imports():
    """The walker itself: a function-level import counts, and so does `from harness.engine import loop`."""
    assert "harness.engine.target" in GRAPH["harness.engine.sizing"]          # imported inside verify_curve
    assert "harness.engine.loop" in GRAPH["baselines.vanilla"]
    assert "reports.figures" in GRAPH["reports.report"]                        # `from reports import figures`
