"""The package's shape: no import cycle among its modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dasd_jax"


def module_imports() -> dict[str, set[str]]:
    """dasd_jax module -> the dasd_jax modules it imports (at any depth of its code)."""
    names = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    parts = name.split(".")[:-node.level] if not path.name == "__init__.py" \
                        else name.split(".")[:len(name.split(".")) - node.level + 1]
                    base = ".".join([*parts, node.module])
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in found if module in names and module != name}
    return graph


def test_no_module_of_the_package_imports_itself_through_others():
    graph = module_imports()
    assert "dasd_jax.train" in graph and "dasd_jax.step" in graph["dasd_jax.train"]
    cycles = []

    def visit(module, path):
        for imported in graph[module]:
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_every_benchmark_is_one_registered_task_found_in_its_own_module():
    from dasd_jax.tasks import registry
    tasks = registry.eval_tasks()
    assert {"gsm8k", "math500", "humaneval", "mbpp", "arc_challenge", "winogrande", "synthetic",
            "synthetic_easy", "synthetic_hard"} <= set(tasks)
    for task in map(registry.eval_task, tasks):
        assert task.prompt and (task.grade or (task.choices and task.choice_lengths)), task.name
    assert set(registry.rewrite_families()) == {"math", "code", "commonsense", "synthetic"}
    assert registry.record_sources() == ("synthetic",)
