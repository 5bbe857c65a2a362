"""The import graph is a picture of the architecture: no cycles, and each layer imports only the ones below it.

Read from the source with `ast` (nothing is imported), so a rule broken in a module the tests never load
still fails here.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanoseek"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The nanoseek modules an import statement loads (`from nanoseek.train import sft` loads nanoseek.train.sft)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in MODULES:  # a name imported from a module, not a module
            parts.pop()
        if parts and ".".join(parts) != module:
            out.add(".".join(parts))
    return out


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules imported when `module` is imported, modules imported inside its functions and classes).
    `if TYPE_CHECKING:` blocks count as neither: they never run."""
    top, inner = set(), set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if nested else top).update(_targets(module, child))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            else:
                visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                          ast.Lambda)))

    visit(ast.parse(MODULES[module].read_text()), False)
    return top, inner


IMPORTS = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _everything(module: str) -> set[str]:
    top, inner = IMPORTS[module]
    return top | inner


def _in(module: str, *areas: str) -> bool:
    return any(module == f"nanoseek.{a}" or module.startswith(f"nanoseek.{a}.") for a in areas)


def test_the_graph_sees_the_package_and_its_cycles():
    assert {"nanoseek.cli", "nanoseek.model.transformer", "nanoseek.data.tasks"} <= set(MODULES)
    assert "nanoseek.data.tasks" in IMPORTS["nanoseek.data.sources"][0]
    assert "nanoseek.cli" in IMPORTS["nanoseek.__main__"][0]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _with_packages(module: str, targets: set[str]) -> set[str]:
    """Importing nanoseek.a.b runs nanoseek/a/__init__.py first: that import counts too (but not the importing
    module's own packages, which are loaded before it)."""
    out = set(targets)
    for t in targets:
        parts = t.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts)) if not module.startswith(".".join(parts[:i]) + ".")}
    return out


def test_no_import_cycles():
    """A cycle works only while its import lines happen to sit in the right order; move the shared piece
    into a module of its own instead."""
    assert _cycles({m: _with_packages(m, IMPORTS[m][0]) for m in MODULES}) == []


@pytest.mark.parametrize("forbidden", ["train", "infer", "data", "kernels", "parallel", "cli", "speedrun", "eval"])
def test_the_model_imports_no_layer_above_it(forbidden):
    """model/ is the DeepSeek-V3 and student networks alone; kernels/ subclass its modules, never the reverse."""
    wrong = {m: sorted(t for t in _everything(m) if _in(t, forbidden)) for m in MODULES if _in(m, "model")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_only_the_entry_point_imports_the_command_line():
    importers = sorted(m for m in MODULES if "nanoseek.cli" in _everything(m))
    assert importers == ["nanoseek.__main__"]
