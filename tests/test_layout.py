"""The package's layout is its architecture: every import points down the layers (foundations, data, processes,
checkpoints, the algorithm, monitoring, the commands, the run and the CLI on top), and no two modules import each
other, directly or through others, not even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "swap_accel"
LAYERS = [{"recipe", "topology", "models"}, {"data"}, {"parallel"}, {"checkpointing"}, {"algorithm"}, {"monitoring"},
          {"tools"}, {"run_context", "results", "train"}, {"cli"}, {"__main__", "__init__"}]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def imports() -> dict[str, set[str]]:
    """Every module (dotted, within swap_accel) and the swap_accel modules it imports, at any depth of its code."""
    graph = {}
    for path in PKG.rglob("*.py"):
        me = ".".join(path.relative_to(PKG).with_suffix("").parts)
        package = me.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:  # `from .pkg import module` names the module too
                    found.add(".".join([*base, node.module]))
                    found.update(".".join([*base, node.module, a.name]) for a in node.names)
                else:
                    found.update(".".join([*base, a.name]) for a in node.names if a.name != "__version__")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("swap_accel."):
                found.add(node.module.removeprefix("swap_accel."))
        graph[me] = {t for t in found if t and (PKG / (t.replace(".", "/") + ".py")).exists()
                     or (PKG / t.replace(".", "/") / "__init__.py").exists()}
    return graph


def test_every_import_points_down_the_layers():
    graph = imports()
    assert {m.split(".")[0] for m in graph} == set(LAYER), "a new top-level module or subpackage needs its layer"
    upward = [f"{me} -> {t}" for me, targets in graph.items() for t in targets
              if LAYER[t.split(".")[0]] > LAYER[me.split(".")[0]]]
    assert upward == []


def test_no_import_cycle():
    graph, state, cycles = imports(), {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []
