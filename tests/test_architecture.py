"""The shape of the house: no import cycle inside vitkit, and every registered format that reads
and writes gives back the model it was handed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import vitkit

SRC = Path(vitkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("vitkit", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))}


def _reexports(tree: ast.Module, package: str) -> dict[str, str]:
    """Names a package ``__init__`` binds at module level by ``from M import name`` -> M (absolute)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, package, is_package=True)
            for a in node.names:
                out[a.asname or a.name] = base
    return out


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported vitkit module: line}, every import statement counted (module level,
    function level, under any ``if``): see :func:`test_no_import_cycle_inside_vitkit` for the rule."""
    mods = _modules()
    packages = {m for m, (p, _) in mods.items() if p.name == "__init__.py"}
    exports = {m: _reexports(mods[m][1], m) for m in packages}

    def origin(package: str, name: str, importer: str) -> str:
        """Where ``from package import name`` leads: the submodule itself; for a name of the
        importer's own package ``__init__``, the module that defines it (followed through
        re-exports); else the package ``__init__`` (all of which runs)."""
        if f"{package}.{name}" in mods:
            return f"{package}.{name}"
        own = importer.startswith(package + ".")
        seen = set()
        while own and package in packages and name in exports[package] and package not in seen:
            seen.add(package)
            src = exports[package][name]
            if src not in mods:
                break
            package = src
            if f"{package}.{name}" in mods:
                return f"{package}.{name}"
        return package

    graph: dict[str, dict[str, int]] = {}
    for m, (path, tree) in mods.items():
        edges = graph.setdefault(m, {})
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, m, path.name == "__init__.py")
                targets = [origin(base, a.name, m) for a in node.names] if base in mods else [base]
            for t in targets:
                if t in mods and t != m:
                    edges.setdefault(t, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small (~150 modules), recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in sccs:
        members, start = set(comp), min(comp)
        # shortest way back to start inside the component (BFS)
        prev: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_no_import_cycle_inside_vitkit():
    """No import cycle inside vitkit, function-level imports included.

    The rule: every ``import`` / ``from ... import`` statement anywhere in a module (module level,
    inside a function, under an ``if``) is an edge from that module to the vitkit module it names:

    * ``import vitkit.a.b`` and ``from vitkit.a.b import x`` lead to ``vitkit.a.b``; ``from vitkit.a
      import b`` where ``b`` is a submodule leads to ``vitkit.a.b``. Python runs the enclosing
      packages' ``__init__`` first; that is how packages work and is not an edge, so a package
      ``__init__`` that imports its own submodules is normal.
    * ``from <its own package> import name`` (a submodule reaching into its package's
      ``__init__``) leads to the module that defines ``name`` (followed through the ``__init__``'s
      re-exports): when that module imports the submodule back, it is a cycle.
    * ``from <another package> import name`` leads to that package's ``__init__``, all of which runs.

    A function-level import is counted because it hides a cycle instead of removing it: the two
    modules still need each other, and the order of imports decides whether it works.
    """
    graph = import_graph()
    cycles = find_cycles(graph)

    def show(c: list[str]) -> str:
        return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"

    assert not cycles, "import cycles inside vitkit:\n" + "\n".join(show(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"vitkit.a": {"vitkit.b": 1}, "vitkit.b": {"vitkit.c": 3}, "vitkit.c": {"vitkit.a": 9},
             "vitkit.d": {"vitkit.a": 1}}
    assert find_cycles(graph) == [["vitkit.a", "vitkit.b", "vitkit.c", "vitkit.a"]]
    assert find_cycles({"vitkit.a": {"vitkit.b": 1}, "vitkit.b": {}}) == []


# --------------------------------------------------------------------------- formats round-trip
def _round_trip_formats():
    from vitkit.interop.formats import REGISTRY

    return [f for f in REGISTRY if f.reads and f.writes]


PLAIN_TINY = dict(image_size=32, patch_size=16, num_classes=5, dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("fmt", _round_trip_formats(), ids=lambda f: f.name)
def test_every_format_that_reads_and_writes_round_trips(fmt, tmp_path):
    """Export a tiny model (the config the format declares, else a plain ViT) and read it back with
    from_pretrained, the format detected: the same logits within 1e-5. Driven by the registry, so a
    new format is covered as soon as it is registered."""
    torch.manual_seed(0)
    model = vitkit.ViT(vitkit.ViTConfig(**{**PLAIN_TINY, **(fmt.tiny or {})}))
    with torch.no_grad():  # move every tensor off its init (zero biases, unit norms, ...) so each must load
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    out = model.export_to(fmt.name, tmp_path / ("out" if fmt.writes_dir else f"out{fmt.suffix}"))
    assert vitkit.interop.detect_format(out) == fmt.name
    back = vitkit.from_pretrained(out, **fmt.tiny_hints)
    x = torch.randn(2, model.config.in_channels, *model.config.image_hw)
    with torch.no_grad():
        want, got = model(x), back(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5, fmt.name


def test_round_trip_covers_the_formats_that_read_and_write():
    names = {f.name for f in _round_trip_formats()}
    assert {"vitkit", "timm", "hf", "torchvision", "jax", "dinov2", "openai_clip"} <= names


def test_every_family_source_names_a_registered_format():
    """``vitkit models --families`` names the format of each source: each is one of the registry."""
    from vitkit.interop.families import FAMILIES
    from vitkit.interop.formats import READ_FORMATS

    named = {s.split(":")[0] for f in FAMILIES for s in (*f.sources, *f.text)}
    assert named and named <= set(READ_FORMATS), named - set(READ_FORMATS)


def test_detection_and_the_reader_share_one_read_of_the_file(tmp_path, monkeypatch):
    """A state dict file is read once: detection lists its keys from the tensors it loads, and the
    reader converts the same tensors (before the registry, detection loaded the file and the reader
    loaded it again)."""
    from vitkit.interop import source

    model = vitkit.ViT(vitkit.ViTConfig(**PLAIN_TINY))
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)  # a pickle: keys need the whole file, unlike a safetensors header
    reads = []
    real = source.read_state_dict
    monkeypatch.setattr(source, "read_state_dict", lambda p: reads.append(p) or real(p))
    back = vitkit.from_pretrained(path, num_heads=2)
    assert back.pretrained_info["format"] == "timm" and reads == [path]
