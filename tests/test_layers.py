"""The package's shape: folders by layer, each importing only the layers below it, no import cycle
between modules, and small modules. Imports are read from the source (every one: at the top, inside
functions and under TYPE_CHECKING), so nothing here depends on what happens to be imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepseek_vl2"
# Each layer and the layers it may import. The package's root (__init__, __main__) sits above them
# all and re-exports the public API; no layer imports it.
LAYERS: dict[str, set[str]] = {
    "compute": set(),
    "inputs": set(),
    "model": {"compute"},
    "engine": {"model", "inputs", "compute"},
    "serving": {"engine", "model", "inputs", "compute"},
}
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, source: str) -> set[str]:
    """The package's modules that the module `name` imports, resolved to modules (a name imported
    from a package that is itself a module counts as that module)."""
    is_package = MODULES[name].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES}
    return found - {name}


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    sources = sources or {name: path.read_text() for name, path in MODULES.items()}
    return {name: imported_modules(name, source) for name, source in sources.items()}


def layer_of(module: str) -> str | None:
    """The layer a module belongs to; None for the package's root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imported in graph.items():
        layer = layer_of(module)
        if layer is None:
            continue  # the root re-exports every layer
        for target in imported:
            other = layer_of(target)
            if other is None:
                wrong.append(f"{module} imports the package root ({target})")
            elif other != layer and other not in LAYERS[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({other})")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    found, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_every_module_belongs_to_a_layer_or_is_the_root():
    loose = [m for m in MODULES if layer_of(m) is None and m not in ("deepseek_vl2", "deepseek_vl2.__main__")]
    assert not loose, f"modules outside the layer folders: {loose}"
    assert {m.split(".")[1] for m in MODULES if layer_of(m)} == set(LAYERS)


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_says_what_it_is_for_and_what_it_may_import(layer):
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"deepseek_vl2/{layer}/__init__.py needs a docstring saying what it may import"


def test_the_checks_see_an_upward_import_and_a_cycle():
    # The checks themselves: a model module reaching up into the engine, even lazily under a
    # function, is reported, and two modules importing each other are a cycle.
    sources = {name: path.read_text() for name, path in MODULES.items()}
    sources["deepseek_vl2.model.config"] += "\n\ndef late():\n    from ..engine.settings import env_int\n"
    graph = import_graph(sources)
    assert upward_imports(graph) == ["deepseek_vl2.model.config (model) imports deepseek_vl2.engine.settings (engine)"]
    sources["deepseek_vl2.engine.settings"] += "\nfrom .scheduler import Scheduler\n"
    sources["deepseek_vl2.engine.scheduler"] += "\nfrom . import settings\n"
    pair = {"deepseek_vl2.engine.scheduler", "deepseek_vl2.engine.settings"}
    assert any(set(cycle) == pair for cycle in cycles(import_graph(sources)))
