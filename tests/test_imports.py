"""The import structure of moe_infer and pipeline, read from the source with `ast` (imports inside functions and
`importlib.import_module("...")` calls included, since a hidden import is still an import):

  * no import circle among the modules of moe_infer, nor among those of pipeline;
  * moe_infer imports from pipeline only its utilities (errors, atomic, outputs, platform, tokenizer, tracking), never
    a stage;
  * each moe_infer package imports only its own layer or those below it (ARCHITECTURE.md, "moe_infer in layers"):
        export_format, collectives, hf_layout  ->  model  ->  placement  ->  moe  ->  buffering  ->  runtime  ->  serve
        ->  bench
    A package's `__main__` is a command, not a layer: it may name any package (moe_infer.buffering's is the old name
    of two benchmarks), and no module may import a `__main__`.

Importing a.b.c runs a/__init__ and a/b/__init__ first, so those are edges too, except into the importer's own
packages (a package's __init__ importing its modules, which import each other, is Python's normal way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("moe_infer", "pipeline")
LAYERS = [
    ("export_format", "collectives", "hf_layout"),
    ("model",),
    ("placement",),
    ("moe",),
    ("buffering",),
    ("runtime",),
    ("serve",),
    ("bench",),
]
PIPELINE_UTILITIES = (
    "pipeline.errors",
    "pipeline.atomic",
    "pipeline.cache",
    "pipeline.outputs",
    "pipeline.platform",
    "pipeline.tokenizer",
    "pipeline.tracking",
)


def module_files(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} for every module of the packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The dotted names `module` imports (absolute), wherever the import statement stands. `from a.b import c` imports
    the module a.b.c when there is one, else the name c of a.b."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, `level - 1` packages up
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the modules of the packages it imports}, with the packages those run first (see the docstring)."""
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        for name in _imported(tree, module, path.name == "__init__.py", set(files)):
            # `from a.b import c` names c, a module or an attribute of a.b: keep the longest name that is a module.
            while name and name not in files:
                name = name.rpartition(".")[0]
            if not name or name == module:
                continue
            targets.add(name)
            parts = name.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if not module.startswith(parent + "."):
                    targets.add(parent)
        targets.discard(module)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int | None:
    """The layer of a moe_infer module (None for moe_infer's own __init__, which imports nothing)."""
    parts = module.split(".")
    if parts[0] != "moe_infer" or len(parts) == 1:
        return None
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for package in PACKAGES:
        sub = {
            m: {t for t in ts if t.split(".")[0] == package} for m, ts in graph.items() if m.split(".")[0] == package
        }
        problems += [f"import circle in {package}: {' -> '.join(c)}" for c in circles(sub)]
    allowed = ", ".join(PIPELINE_UTILITIES)
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target.split(".")[-1] == "__main__":
                problems.append(f"{module} imports {target}, a command")
            if not module.startswith("moe_infer."):
                continue
            stage = target.startswith("pipeline.") and not target.startswith(PIPELINE_UTILITIES)
            if stage:
                problems.append(f"{module} imports {target}, a pipeline stage (moe_infer may import {allowed})")
            here, there = layer_of(module), layer_of(target)
            if module.split(".")[-1] != "__main__" and here is not None and there is not None and there > here:
                above = f"{'/'.join(LAYERS[there])} is above {'/'.join(LAYERS[here])}"
                problems.append(f"{module} imports {target}, a layer above its own: {above}")
    return problems


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # moe.layer builds the peers' blocks only when asked: imports inside build_moe_layer.
    assert {"moe_infer.moe.baselines.deepspeed", "moe_infer.moe.baselines.megatron"} <= graph["moe_infer.moe.layer"]
    # Commands import what they run.
    assert "moe_infer.bench.cli" in graph["moe_infer.buffering.__main__"]
    assert layer_of("moe_infer.bench.model") > layer_of("moe_infer.serve.cli") > layer_of("moe_infer.runtime.engine")


def test_no_circles_no_stage_imports_and_every_moe_infer_import_goes_down():
    assert violations(import_graph()) == []


@pytest.mark.parametrize(
    "module, source, problem",
    [
        ("moe_infer/moe/layer.py", "def f():\n    from moe_infer.runtime.engine import Engine\n", "a layer above"),
        ("moe_infer/placement/map.py", "def f():\n    from pipeline.train import routing\n", "a pipeline stage"),
        ("pipeline/tokenizer/__init__.py", "def f():\n    import pipeline.config\n", "import circle in pipeline"),
        ("moe_infer/serve/requests.py", "from moe_infer.serve import cli\n", "import circle in moe_infer"),
        ("moe_infer/runtime/engine.py", "import moe_infer.placement.__main__\n", "a command"),
    ],
)
def test_each_rule_catches_its_violation(tmp_path, module, source, problem):
    """The same check on a copy of the tree with one import added: the violation is named."""
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + source)
    found = violations(import_graph(tmp_path))
    assert any(problem in line for line in found), found


def test_moe_infer_imports_transformers_only_where_it_is_used():
    """transformers is an optional extra: no moe_infer module imports it when the module itself is imported (only
    inside the functions of the transformers baseline), so serving and every other benchmark run without it."""
    offenders = []
    for module, path in module_files().items():
        if not module.startswith("moe_infer"):
            continue
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
        offenders += [f"{module}: {name}" for name in names if name.split(".")[0] in ("transformers", "tokenizers")]
    assert offenders == []
