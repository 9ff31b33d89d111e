"""The import graph of the package (README "Project layout"): no cycles, nothing imports upwards, and
the data package is read by nobody below the trainer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "micronet_jax"
# Low to high; a module may import only modules listed before it.
LAYERS = [
    "config", "models", "losses", "optim", "core", "checkpointing", "workdir", "preemption", "cli",
    "inputs", "data", "infer", "ensemble", "metrics", "postprocess", "slide", "stitch", "export", "visualize",
    "wsi", "evaluate", "plots", "reporting", "train", "multiseed", "ablation", "benchmark", "main", "tools",
]
BELOW_THE_TRAINER = ["config", "models", "losses", "optim", "core", "checkpointing", "workdir",
                     "preemption", "cli", "inputs", "infer", "ensemble", "metrics", "postprocess", "reporting"]


def _imports() -> dict[str, set[str]]:
    """Top-level module (data/ and models/ as one each) -> the package modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = ([f"micronet_jax.{a.name}" for a in node.names]
                         if node.module == "micronet_jax" else [node.module])
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "micronet_jax" and len(parts) > 1 and parts[1] != here:
                    graph.setdefault(here, set()).add(parts[1])
    return graph


def test_every_module_is_in_a_layer():
    modules = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*")
               if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert modules - {"__init__"} == set(LAYERS)


def test_imports_only_point_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} imports {n}" for m, deps in _imports().items() for n in deps if rank[n] >= rank[m]]
    assert not upward, upward


def test_no_module_below_the_trainer_reads_data():
    graph = _imports()
    assert not [m for m in BELOW_THE_TRAINER if "data" in graph.get(m, set())]
