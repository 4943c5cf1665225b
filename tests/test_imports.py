"""kdet's modules import one way: no import circles, no private names taken across modules.

The graph counts every ``import`` / ``from ... import`` of a kdet module, at module level and
inside functions alike (a function-level import is how a circle hides from a first look).
``python tests/test_imports.py`` prints the circles and private imports it finds.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdet"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def kdet_modules():
    """``{dotted name: path}`` of every module of the package."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(node, module, is_package):
    """The module a ``from`` statement names, with relative levels resolved."""
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(name, modules):
    """The kdet module ``name`` is, or the closest package above it that is one (None: not kdet's)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module, path, modules):
    """``[(imported kdet module, [names taken from it], line)]`` for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                # ``from kdet import engine`` imports the module kdet.engine; ``from kdet.x import y`` takes name y
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, [], node.lineno))
                    continue
                target = _resolve(base, modules)
                if target:
                    found.append((target, [alias.name], node.lineno))
    return found


def import_graph():
    """``{module: {imported module, ...}}`` among kdet's modules, as the import statements name them."""
    modules = kdet_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in imports_of(name, path, modules):
            if target != name:
                graph[name].add(target)
    return graph


def find_cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _cycle_path(graph, component):
    """One loop through ``component``: ``a -> b -> ... -> a``."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    node = start
    while True:
        nxt = sorted(n for n in graph[node] if n in members)
        back = start in nxt and len(path) > 1
        if back:
            return " -> ".join(path + [start])
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return " -> ".join(path + [nxt[0]]) if nxt else " <-> ".join(component)
        node = fresh[0]
        path.append(node)
        seen.add(node)


def private_imports():
    """``["kdet/a.py:12 takes _name from kdet.b"]``: private names one module takes from another."""
    modules = kdet_modules()
    found = []
    for name, path in modules.items():
        for target, names, line in imports_of(name, path, modules):
            if target == name:
                continue
            for taken in names:
                if taken.startswith("_") and not taken.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{line} takes {taken} from {target}")
    for name, path in modules.items():  # ``module._name`` on an imported kdet module
        found += _private_attributes(name, path, modules)
    return sorted(found)


def _private_attributes(name, path, modules):
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}  # local name -> kdet module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, path.name == "__init__.py")
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != name):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} takes {node.attr} from {aliases[node.value.id]}")
    return found


def test_the_graph_sees_function_level_imports(tmp_path):
    modules = kdet_modules()
    assert "kdet.engine" in modules and "kdet.data.augment" in modules
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from kdet.engine import train, _x\n    import kdet.data.augment\n"
                     "    from kdet import config\n    from kdet.data.pipeline import make_dataset as md\n")
    found = {(target, tuple(names)) for target, names, _ in imports_of("kdet.probe", probe, modules)}
    assert found == {("kdet.engine", ("train",)), ("kdet.engine", ("_x",)), ("kdet.data.augment", ()),
                     ("kdet.config", ()), ("kdet.data.pipeline", ("make_dataset",))}


def test_no_import_circles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import circles among kdet's modules:\n" + "\n".join(
        f"  {_cycle_path(graph, c)}" for c in cycles)


def test_no_private_names_imported_across_modules():
    found = private_imports()
    assert not found, "private names imported across modules:\n" + "\n".join(f"  {f}" for f in found)


def test_find_cycles_names_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert _cycle_path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"


if __name__ == "__main__":
    graph = import_graph()
    cycles = find_cycles(graph)
    print(f"{len(cycles)} import circles")
    for c in cycles:
        print("  " + _cycle_path(graph, c))
    found = private_imports()
    print(f"{len(found)} private names imported across modules")
    for f in found:
        print("  " + f)
