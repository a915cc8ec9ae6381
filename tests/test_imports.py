"""The import graph of every package, read from the source with ``ast``: no cycles, and the
dependency direction of DESIGN.md (``vae`` and ``conditioning`` import neither ``ldm`` nor ``train``;
``ldm`` never imports ``train``; ``ldm_io`` imports only the standard library). Inside ``train``,
imports go one way: a stage (``train.vae``, ``train.clip``, ``train.unet``) -> the run core
(``train.run``) and the data room (``train.data``) -> the library; no stage imports another, and the
run core and the data room import no stage.

Every import counts, at module level or inside a function (a lazy import is still a dependency and
still closes a cycle). Imports under ``if TYPE_CHECKING:`` are left out: they never run. An import
of ``a.b`` is an edge to ``a.b`` only, not to the package ``a`` (Python runs ``a/__init__.py`` first,
but a package importing its own submodules is how packages work, not a cycle).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "ldm_io", "vae", "conditioning", "train")
STAGES = ("train.vae", "train.clip", "train.unet")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name imported anywhere in ``tree`` (``from a import b`` gives a.b and a)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports: library modules by name, anything else by its top-level name."""
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py"):
            if imported in modules:
                edges.add(imported)
            elif imported.rsplit(".", 1)[0] in modules and imported.split(".")[0] in PACKAGES:
                continue  # `from pkg.mod import name`: the edge to pkg.mod is there already
            else:
                edges.add(imported.split(".")[0])
        graph[name] = edges - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offending(graph: dict[str, set[str]], importers: tuple[str, ...], forbidden) -> list:
    """(module, [what it should not import]) for every module under ``importers`` that imports a module
    under ``forbidden`` (packages or dotted prefixes)."""
    return sorted((m, sorted(t for t in targets if _within(t, forbidden)))
                  for m, targets in graph.items()
                  if _within(m, importers) and any(_within(t, forbidden) for t in targets))


def test_the_graph_is_read_from_every_library_file():
    graph = import_graph()
    assert {"ldm.pipeline", "ldm.bundle", "ldm.web.export", "vae.autoencoder", "conditioning.encoders", "ldm_io"} <= set(graph)
    assert "ldm.bundle" in graph["ldm.pipeline"] and "ldm_io" in graph["vae.autoencoder"]
    assert "conditioning.open_clip_backend" in graph["conditioning.loading"]  # imports inside functions count


def test_find_cycles_finds_a_lazy_cycle():
    tree = ast.parse("import b\ndef f():\n    from a import g\n")
    assert imported_names(tree, "a", False) == {"b", "a", "a.g"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_vae_and_conditioning_import_neither_ldm_nor_train():
    assert offending(import_graph(), ("vae", "conditioning"), {"ldm", "train"}) == []


def test_ldm_never_imports_train():
    """Except the one edge DESIGN.md names: ldm/cli.py reads the training subcommands' table, which
    train owns (train.commands, no imports of its own), when it parses a command line; ``import ldm``
    and ``import ldm.cli`` import nothing of train (tests/test_cli.py checks that at run time)."""
    assert offending(import_graph(), ("ldm",), {"train"}) == [("ldm.cli", ["train.commands"])]
    assert import_graph()["train.commands"] == set()


def test_training_imports_go_one_way():
    graph = import_graph()
    assert {"train.run.checkpoint", "train.data.split", "train.vae.trainer", "train.clip.trainer",
            "train.unet.trainer"} <= set(graph)
    assert offending(graph, ("train.run",), ("train.data", *STAGES)) == []
    assert offending(graph, ("train.data",), ("train.run", *STAGES)) == []
    for stage in STAGES:
        assert offending(graph, (stage,), tuple(s for s in STAGES if s != stage)) == [], stage


def test_every_training_command_names_a_module_with_its_two_functions():
    import importlib

    from train.commands import COMMANDS

    for name, (module, _) in COMMANDS.items():
        loaded = importlib.import_module(module)
        assert callable(loaded.add_arguments) and callable(loaded.run), name


def test_ldm_io_imports_only_the_standard_library():
    graph = import_graph()
    outside = {t for m, targets in graph.items() if m.split(".")[0] == "ldm_io" for t in targets
               if t.split(".")[0] not in (*sys.stdlib_module_names, "ldm_io") and t != "__future__"}
    assert outside == set()
