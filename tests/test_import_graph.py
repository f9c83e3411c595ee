"""fidbench's modules import one another in one direction: the graph of their imports (those inside functions too)
has no cycle. Importing ``a.b.c`` runs the package ``a.b`` first, so a module depends on its parent packages."""

import ast

from helpers import ROOT

PACKAGE = ROOT / "fidbench"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, modules: set[str]) -> set[str]:
    """The fidbench modules ``path`` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import x`: the module x
    out = set()
    for target in found & modules:
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # a module and the packages above it
    return out - {name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as the path of its modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_of_fidbench_has_no_cycle():
    edges = graph()
    assert "fidbench.medusa_train" in edges["fidbench.methods.medusa"]  # imports inside functions count
    found = cycle(edges)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_a_cycle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
