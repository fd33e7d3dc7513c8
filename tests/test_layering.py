"""The package's layers point one way: commands -> training -> (objectives, tasks, evaluation, inference, ...)
-> (model, memory, sampling) -> kernels; data, parallel, paths and metrics stand alone. Read from the source's imports
(function-level ones included), so a lazy import cannot hide a cycle."""

import ast
import pathlib

import jaxgrounding

PACKAGE = pathlib.Path(jaxgrounding.__file__).parent
COMMANDS = {"train", "evaluate", "ground"}
# unit -> layer; a unit may import units of its own layer or lower ones. Unlisted units must be added here.
LAYERS = {
    "data": 0, "parallel": 0, "metrics": 0, "config": 0, "kernels": 0, "paths": 0,
    "model": 1, "memory": 2, "sampling": 2,
    "objectives": 3, "tasks": 3, "grounding_model": 4, "inference": 5, "settings": 6, "evaluation": 7,
    "training": 8,
    "train": 9, "evaluate": 9, "ground": 9,
}  # fmt: skip


def _unit(module: str) -> str:
    """jaxgrounding.memory.hvr -> memory; jaxgrounding.train -> train."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """{importing module: imported jaxgrounding modules}."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("jaxgrounding",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxgrounding"):
                # `from jaxgrounding import x` imports the unit x; `from jaxgrounding.x.y import z`, module x.y.
                top = node.module == "jaxgrounding"
                imported |= {f"{node.module}.{a.name}" if top else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("jaxgrounding.")}
        graph[module] = {m for m in imported if m != "jaxgrounding"}
    return graph


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _imports() if m != "jaxgrounding"}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_point_down():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _imports().items()
        if module != "jaxgrounding"
        for target in targets
        if LAYERS[_unit(target)] > LAYERS[_unit(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_training_is_imported_by_the_commands_only():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if _unit(target) == "training" and _unit(module) not in COMMANDS | {"training"}
    )
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_units():
    edges = {}
    for module, targets in _imports().items():
        if module != "jaxgrounding":
            edges.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    state = {}

    def visit(unit, path):
        if state.get(unit) == "done":
            return
        assert state.get(unit) != "open", "import cycle: " + " -> ".join(path + [unit])
        state[unit] = "open"
        for nxt in sorted(edges.get(unit, ())):
            visit(nxt, path + [unit])
        state[unit] = "done"

    for unit in sorted(edges):
        visit(unit, [])
