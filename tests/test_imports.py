"""No import circles inside the package: every `import memtx...` / `from memtx... import ...`
(at module level or inside a function, not under `if TYPE_CHECKING:`) is an edge, and the graph
has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memtx"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from memtx.memory import knn` imports the submodule knn; `from memtx.data import
                # open_source` imports the package memtx.data
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _is_type_checking_block(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    """The check would fail on the package with one circle added: a copy of memtx/ where the kNN
    memory imports the attention module inside a function (attention imports the kNN memory at
    the top); the unchanged copy has no circle."""
    import shutil
    copy = tmp_path / "memtx"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    assert find_cycle(import_graph(copy)) is None
    knn = copy / "memory" / "knn.py"
    knn.write_text(knn.read_text() + "\n\ndef _planted():\n    from memtx import attention  # noqa\n")
    cycle = find_cycle(import_graph(copy))
    assert cycle is not None and {"memtx.attention", "memtx.memory.knn"} <= set(cycle), cycle


def test_no_import_circles():
    assert find_cycle(import_graph()) is None


def test_the_config_module_imports_no_jax():
    """memtx.config validates a config (every kind's options, the kNN store's choices) without
    JAX or Flax: a process that imports it and resolves a preset has neither loaded."""
    import os
    import subprocess
    import sys

    code = ("import sys; from memtx.config import load_config_file; "
            "cfg = load_config_file('configs/knn.py:cpu'); "
            "print(cfg.model.knn.backend, 'jax' in sys.modules, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[1:] == ["False", "False"], out.stdout


def test_the_libraries_do_not_import_the_command_line():
    """Evaluation, the steps, the model and the memories are libraries: no import path from them
    reaches memtx.cli (its --print-config handling exits the process)."""
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    libraries = ["memtx.evaluation", "memtx.cache_tuning", "memtx.step", "memtx.state", "memtx.model",
                 "memtx.checkpoint", "memtx.memory.registry", "memtx.memory.model_memory", "memtx.config"]
    assert {lib: "memtx.cli" in reach(lib) for lib in libraries} == dict.fromkeys(libraries, False)
    assert "memtx.cli" in reach("memtx.evaluate")  # the check can fail: a command line reaches it
