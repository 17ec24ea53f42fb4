"""The code's shape, as the style guide asks: short functions, no import circles in fedbench/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedbench"
MAX_FUNCTION_LINES = 60


def parsed_modules() -> dict[str, ast.Module]:
    return {f"fedbench.{p.stem}" if p.stem != "__init__" else "fedbench": ast.parse(p.read_text())
            for p in sorted(PACKAGE.glob("*.py"))}


def test_no_function_in_fedbench_is_longer_than_60_lines():
    long = []
    for module, tree in parsed_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long


def imports_of(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """fedbench modules this module imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known and name != module)
    return found


def test_fedbench_modules_import_each_other_without_a_circle():
    modules = parsed_modules()
    graph = {name: imports_of(name, tree, set(modules)) for name, tree in modules.items()}
    assert "fedbench.execution" in graph["fedbench.cli"], "the graph sees function-local imports too"
    visiting, done, cycles = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(visiting[visiting.index(name):] + [name])
            return
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_a_new_attack_or_defense_file_registers_itself_without_editing_a_list(tmp_path):
    """Importing the package registers every module in it: a file dropped into a copy of
    attacks/ (and defenses/) shows up in the registry."""
    import shutil
    import subprocess
    import sys

    root = PACKAGE.parent
    for package in ("attacks", "defenses"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "attacks" / "my_probe.py").write_text(
        "from attacks.base import ATTACKS, Attack\n\n@ATTACKS.register('my_probe')\nclass MyProbe(Attack):\n    pass\n")
    (tmp_path / "defenses" / "my_probe.py").write_text(
        "from defenses.base import DEFENSES, Defense\n\n@DEFENSES.register('my_probe')\nclass MyProbe(Defense):\n    pass\n")
    script = "from attacks import ATTACKS; from defenses import DEFENSES; print('my_probe' in ATTACKS, 'my_probe' in DEFENSES)"
    env = {"PYTHONPATH": f"{tmp_path}{':' + str(root)}", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
