"""The package's layering rules, checked from the source (no imports executed).

- no import cycle between bloodray modules (function-level imports count too: a cycle hidden in a function is
  still a cycle a reader has to untangle);
- no module imports another module's private (``_``-prefixed) name;
- no module over the size limit;
- checkpoint file names appear only in ``bloodray/checkpoint.py``, run-directory names only in ``bloodray/rundir.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bloodray"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            found.append((target, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            if not target.startswith("bloodray"):
                continue
            # `from bloodray.x import y` imports module bloodray.x.y when y is a submodule.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            deps = subs or ([target] if target in MODULES else [])
            graph[name].update(d for d in deps if d != name and not name.startswith(d + ".") and d != "bloodray")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _package(module: str) -> str:
    """The unit of layering: a subpackage (``bloodray.evaluation``) or a top-level module (``bloodray.predict``)."""
    return ".".join(module.split(".")[:2])


def test_no_package_level_import_cycles():
    """Modules may form no cycle, and neither may packages: ``evaluation`` importing ``predict`` while ``predict``
    imports something of ``evaluation`` is a loop a reader has to untangle even when no two modules form one.

    The output packages layer as ``nightly`` (the job, the contract, the tables) < ``analysis`` (the query views,
    the reviews' views included, and the report) < ``review`` (import, export, the review page); what runs after
    a commit is passed in by ``nightly_job`` (the verified refresh), which sits above all three."""
    packages: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        packages.setdefault(_package(name), set()).update(_package(d) for d in deps if _package(d) != _package(name))
    cycles = _cycles(packages)
    assert not cycles, "package-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


BENCH = PACKAGE.parent / "bench"


def test_bench_scripts_share_code_through_common_only():
    """A bench script imports no other bench script: shared helpers live in ``bench/_common.py``."""
    scripts = {path.stem for path in BENCH.glob("*.py")}
    offenders = []
    for path in sorted(BENCH.glob("*.py")):
        for target, _names in _imports(path.stem, path):
            top = target.split(".")[0]
            if top in scripts and top not in ("_common", path.stem):
                offenders.append(f"bench/{path.name} imports bench/{top}.py")
    assert not offenders, "\n".join(offenders) + "\n(move what they share into bench/_common.py)"


def test_no_private_names_imported_across_modules():
    offenders = []
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            if target.startswith("bloodray") and target != name:
                offenders += [f"{name}: from {target} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (limit {MAX_LINES}): split it by responsibility"


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and not isinstance(getattr(n, "parent", None), ast.Expr)]


def _docstring_nodes(path: Path) -> set[int]:
    tree = ast.parse(path.read_text(), str(path))
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(first.value.lineno)
    return ids


OWNED_NAMES = {
    "bloodray/checkpoint.py": [r"model\.safetensors", r"bloodray\.json", r"train_state\.pt"],
    "bloodray/rundir.py": [r"split\.parquet", r"data_report\.json", r"summary\.json", r"^calibrated$",
                           r"^checkpoint_\*?$", r"checkpoint_epoch"],
}


@pytest.mark.parametrize("owner", sorted(OWNED_NAMES))
def test_file_names_have_one_owner(owner):
    patterns = [re.compile(p) for p in OWNED_NAMES[owner]]
    offenders = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(PACKAGE.parent))
        if rel == owner:
            continue
        docstrings = _docstring_nodes(path)
        for lineno, value in _string_literals(path):
            if lineno in docstrings:
                continue
            if any(p.search(value) for p in patterns):
                offenders.append(f"{rel}:{lineno}: {value!r}")
    assert not offenders, f"names owned by {owner} spelled elsewhere:\n" + "\n".join(offenders)
