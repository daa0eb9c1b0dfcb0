"""The shape of the code base (docs/layout.md): no import cycle, each layer imports only the layers
below it, and every module reads in one sitting."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "records", "studies", "analysis", "hydra_plugins")
MAX_LINES = 400


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


@functools.cache
def module_path(module: str) -> Path | None:
    """The file of a project module (a package is its __init__.py), or None where there is none."""
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: Path, module: str) -> set[str]:
    """Every project module `path` imports: at module level, inside functions and under
    `if TYPE_CHECKING:` alike (a type-only import still ties the two modules together)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    ours = {m for m in found if m.split(".")[0] in PACKAGES and module_path(m) is not None}
    return ours - {module}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            graph[module] = imports_of(path, module)
    return graph


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_import_cycle_between_project_modules_counting_type_checking_and_function_level_imports():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1 and nxt in trail:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# What each layer may import from the project (by prefix); everything else of the project is above it.
ALLOWED = {
    "moe.model": ("moe.model",),
    "moe": ("moe",),
    "records": ("records", "moe.files"),
    "analysis": ("analysis", "records", "moe"),
}


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = {
        module: sorted(d for d in deps if not d.startswith(ALLOWED[layer]))
        for module, deps in import_graph().items()
        if module == layer or module.startswith(layer + ".")
    }
    wrong = {m: d for m, d in wrong.items() if d}
    assert not wrong, f"{layer} may import only {ALLOWED[layer]}: {wrong}"


def test_the_model_library_imports_no_orchestration():
    orchestration = {"hydra", "omegaconf", "mlflow", "submitit"}
    offenders = {
        str(path.relative_to(REPO)): sorted(third_party_imports(path) & orchestration)
        for path in (REPO / "moe").rglob("*.py")
    }
    assert not {p: n for p, n in offenders.items() if n}


def test_every_module_and_test_file_reads_in_one_sitting():
    files = [p for package in (*PACKAGES, "tests") for p in (REPO / package).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 150, "the walk must see the whole tree"
    assert not long, f"over {MAX_LINES} lines: {long}"


@functools.cache
def defined_names(path: Path) -> set[str]:
    """Names a module defines itself: functions, classes, assignments (not the ones it imports)."""
    names = set()
    for node in parsed(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a name defined one way or another
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, ast.Assign):
                    names.update(n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    """One import path per name: no module hands on a name it imported itself (a re-export)."""
    files = [p for package in (*PACKAGES, "tests") for p in (REPO / package).rglob("*.py")]
    through = []
    for path in files:
        for node in ast.walk(parsed(path)):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            source = module_path(node.module) if node.module.split(".")[0] in PACKAGES else None
            if source is None:
                continue
            own = defined_names(source)
            for alias in node.names:
                if alias.name not in own and module_path(f"{node.module}.{alias.name}") is None:
                    through.append(f"{path.relative_to(REPO)}: {alias.name} from {node.module}")
    assert not through, "\n".join(through)
