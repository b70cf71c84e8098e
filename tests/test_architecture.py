"""The package's shape: one import name, an import graph without circles, no private names across modules.

- The wheel installs one top-level name, `pocketlm` (runtime/ is the package, convert/ is
  `pocketlm.converters`, by pyproject's package-dir), with every subpackage and module of the two folders.
- The import graph of `pocketlm` has no cycle. It is read statically: every import anywhere in a
  module counts (function-local ones, those under `if TYPE_CHECKING:`, in `try:`), relative imports
  are resolved, `from P import X` is an edge to `P.X` when that is a module and to `P` otherwise;
  importing `a.b.c` does not count as importing `a` or `a.b` (Python runs the parents' __init__ first,
  but a package whose __init__ is imported by its submodules is not a circle).
- No underscore name crosses a module boundary: neither `from m import _x` (nor a private module
  `m._y`), nor `expr._x` / `getattr(expr, "_x")` where expr is not `self`/`cls` and the module does
  not define `_x` itself. Third-party internals the package relies on are listed in THIRD_PARTY_INTERNALS,
  each with its reason; an entry may not name a private name another pocketlm module defines.

`python tests/test_architecture.py` prints every current violation (cycles and underscore uses).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pocketlm"
# pyproject's [tool.setuptools] package-dir: import name -> folder of the repository
FOLDERS = {"pocketlm": "runtime", "pocketlm.converters": "convert"}
SUBPACKAGES = ["core", "loading", "backends", "serving", "cli", "converters"]

# Third-party internals used on purpose: (pocketlm module, underscore name) -> whose, with why above it.
# Only other libraries' names belong here: an entry never excuses an import from a pocketlm module, and
# the test refuses an entry whose name another pocketlm module defines. pocketlm's own private names
# crossing modules are what the test exists to find; they are fixed in the code, never listed here.
THIRD_PARTY_INTERNALS: dict[tuple[str, str], str] = {
    # The standard library's pure-Python unpickler: the C one sizes its memo table by the largest index a
    # pickle names, so a forged LONG_BINPUT can make it allocate gigabytes (torch_pickle.RestrictedUnpickler).
    ("pocketlm.converters.torch_pickle", "_Unpickler"): "pickle._Unpickler",
    # llama-cpp-python (pinned to 0.3.36) exposes ggml's base library and its loader only from these private
    # modules; imatrix reads the activations through ggml's tensor functions, which llama_cpp does not wrap.
    ("pocketlm.converters.ggml_quant", "_ctypes_extensions"): "llama_cpp._ctypes_extensions",
    ("pocketlm.converters.ggml_quant", "_ggml"): "llama_cpp._ggml",
}


# ---------------------------------------------------------------------------------------------------------
# Reading the package


@dataclass
class Module:
    name: str  # pocketlm.core.model
    path: str  # runtime/core/model.py, as printed
    is_package: bool
    tree: ast.Module


def read_modules(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> dict[str, Module]:
    """Every .py file under the package's folders, by its module name."""
    modules: dict[str, Module] = {}
    for prefix, folder in folders.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join([prefix, *parts])
            shown = path.relative_to(root).as_posix()
            modules[name] = Module(name, shown, is_package, ast.parse(path.read_text(), filename=shown))
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name of the module `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return ""  # above the top package: unresolved
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: Module):
    """(line, imported module name, names imported from it) for every import statement in the module."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, _resolve(module, node), [alias.name for alias in node.names]


# ---------------------------------------------------------------------------------------------------------
# The import graph


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, list[int]]]:
    """module -> {imported pocketlm module: lines}; self-imports dropped."""
    known = set(modules)
    graph: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    for module in modules.values():
        for line, source, names in imports(module):
            targets = []
            if not names:  # import a.b.c: a.b.c itself (its parents are implicit)
                targets.append(source)
            for name in names:
                sub = f"{source}.{name}"
                targets.append(sub if sub in known else source)
            for target in targets:
                if target in known and target != module.name:
                    graph[module.name].setdefault(target, []).append(line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def find_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """For every import edge inside a circle, the shortest cycle through it (each cycle once, starting at
    its smallest name): breaking every cycle listed breaks every circle."""
    cycles: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph):
        members = set(component)
        for a in component:
            for b in sorted(graph[a]):
                if b not in members:
                    continue
                # shortest path b -> a inside the component
                previous: dict[str, str | None] = {b: None}
                queue = deque([b])
                while queue and a not in previous:
                    node = queue.popleft()
                    for nxt in sorted(graph[node]):
                        if nxt in members and nxt not in previous:
                            previous[nxt] = node
                            queue.append(nxt)
                path, node = [], a
                while node is not None:
                    path.append(node)
                    node = previous[node]
                cycle = [a, *reversed(path)][:-1]  # a -> b -> ... (a last dropped)
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
    return [list(c) for c in sorted(cycles, key=lambda c: (len(c), c))]


def format_cycle(cycle: list[str]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def cycle_report(modules: dict[str, Module]) -> list[str]:
    graph = import_graph(modules)
    lines = []
    for cycle in find_cycles(graph):
        lines.append(format_cycle(cycle))
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            where = ", ".join(str(n) for n in sorted(set(graph[a][b])))
            lines.append(f"    {modules[a].path}:{where} imports {b}")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Underscore names across modules


@dataclass(frozen=True, order=True)
class Use:
    path: str
    line: int
    name: str
    module: str  # the pocketlm module the use is in
    internal: bool = False  # imported from a pocketlm module

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}"


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _bound_here(statements: list[ast.stmt]):
    """Names a module or class body binds itself (not inside its functions or nested classes)."""
    todo: list[ast.AST] = list(statements)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id  # (a name it imports is not its own: `from m import _x` does not make `o._x` local)
        if isinstance(node, _SCOPES):
            continue  # its own name is collected by defined_names
        todo.extend(ast.iter_child_nodes(node))


def defined_names(tree: ast.Module) -> set[str]:
    """What a module defines itself: functions, classes and methods, module-level names, class attributes
    and dataclass fields, attributes assigned on self/cls or on one of its own classes, globals."""
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    names = set(_bound_here(tree.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(_bound_here(node.body))
        elif isinstance(node, ast.Global):
            names.update(node.names)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, (ast.Store, ast.Del))
            and isinstance(node.value, ast.Name)
            and node.value.id in {"self", "cls", *classes}
        ):
            names.add(node.attr)
    return names


_BY_NAME = {"getattr", "hasattr", "setattr", "delattr"}


def _attribute_uses(tree: ast.Module):
    """(line, expr, name) for `expr.name` and getattr(expr, "name") & co. with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _BY_NAME
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            yield node.lineno, node.args[0], node.args[1].value


def underscore_uses(modules: dict[str, Module]) -> list[Use]:
    """Every private name a module imports from another module or reaches on another object."""
    uses: set[Use] = set()
    for module in modules.values():
        mine = defined_names(module.tree)
        for line, source, names in imports(module):
            internal = _is_internal(source)
            for part in source.split("."):  # a private module: pocketlm.x._y, llama_cpp._ggml
                if _is_private(part):
                    uses.add(Use(module.path, line, part, module.name, internal))
            for name in names:
                if _is_private(name):
                    uses.add(Use(module.path, line, name, module.name, internal))
        for line, expr, name in _attribute_uses(module.tree):
            if not _is_private(name) or name in mine:
                continue
            if isinstance(expr, ast.Name) and expr.id in {"self", "cls"}:
                continue
            uses.add(Use(module.path, line, name, module.name))
    return sorted(uses)


def underscore_report(modules: dict[str, Module], allowed=THIRD_PARTY_INTERNALS) -> tuple[list[Use], list[str]]:
    """(violations, problems with the allow-list: stale entries, entries naming pocketlm's own names)."""
    private = {m.name: {n for n in defined_names(m.tree) if _is_private(n)} for m in modules.values()}

    def ours(module: str, name: str) -> bool:  # defined by a pocketlm module other than the one using it
        return any(name in names for other, names in private.items() if other != module)

    uses = underscore_uses(modules)
    violations = [u for u in uses if u.internal or (u.module, u.name) not in allowed or ours(u.module, u.name)]
    used = {(u.module, u.name) for u in uses if not u.internal}
    problems = [f"allow-list entry {key} is not used any more: remove it" for key in allowed if key not in used]
    problems += [f"allow-list entry {key} names a private name pocketlm defines" for key in allowed if ours(*key)]
    return violations, problems


# ---------------------------------------------------------------------------------------------------------
# The package


def test_the_wheel_installs_only_pocketlm(tmp_path):
    """Build the wheel from a copy of the working tree (an in-tree build would leave build/ behind, and
    setuptools copies whatever a previous build left in build/lib into the next wheel) and read it."""
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in FOLDERS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for path in ROOT.iterdir():
        if path.is_file() and path.name.startswith(("pyproject", "setup.", "README", "LICEN", "COPYING", "NOTICE")):
            shutil.copy(path, source / path.name)
    # The venv's setuptools builds it when it satisfies build-system.requires (fast, offline); otherwise pip
    # fetches setuptools into an isolated environment, and only a network failure there skips the test.
    isolated = not _has_build_backend(source / "pyproject.toml")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(tmp_path / "dist"), "-q"]
    command += ["--retries", "1", "--timeout", "15"] if isolated else ["--no-build-isolation"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    offline = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if any(s in line for s in _OFFLINE)]
    if proc.returncode and isolated and offline:
        pytest.skip(f"the wheel needs its build backend from the network, which is not reachable: {offline[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("pocketlm-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        files = [n for n in archive.namelist() if not n.endswith("/")]
        (info,) = {n.split("/")[0] for n in files if n.split("/")[0].endswith(".dist-info")}
        record = [line.split(",")[0] for line in archive.read(f"{info}/RECORD").decode().splitlines() if line]
        top_level = archive.read(f"{info}/top_level.txt").decode().split() if f"{info}/top_level.txt" in files else None
        entry_points = archive.read(f"{info}/entry_points.txt").decode() if f"{info}/entry_points.txt" in files else ""
    assert sorted(record) == sorted(files), "RECORD does not list the wheel's files"
    tops = {n.split("/")[0] for n in record} - {info}
    assert tops == {PACKAGE}, f"top-level names installed: {sorted(tops)}"
    assert all(n.startswith(f"{PACKAGE}/") for n in record if n.endswith(".py")), "a .py file outside pocketlm/"
    if top_level is not None:
        assert top_level == [PACKAGE], f"top_level.txt: {top_level}"
    for line in entry_points.splitlines():
        if "=" in line:
            assert line.split("=", 1)[1].strip().startswith(f"{PACKAGE}."), f"entry point outside pocketlm: {line}"

    py_files = {n for n in record if n.endswith(".py")}
    for sub in ["", *(f"{s}/" for s in SUBPACKAGES), "converters/core/", "converters/architectures/"]:
        assert f"{PACKAGE}/{sub}__init__.py" in py_files, f"{PACKAGE}/{sub}__init__.py is not in the wheel"
    # and every module of the two folders, where its name says (a subpackage missing from pyproject's
    # `packages` would be left out of the wheel while the tests, run from the repository, still import it)
    expected = {m.name.replace(".", "/") + ("/__init__.py" if m.is_package else ".py") for m in read_modules().values()}
    assert sorted(expected - py_files) == [], "modules of the repository missing from the wheel"
    assert sorted(py_files - expected) == [], "files in the wheel that are not in the repository"


_OFFLINE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
    "ConnectTimeoutError",
    "Read timed out",
    "ProxyError",
    "(from versions: none)",
)


def _has_build_backend(pyproject: Path) -> bool:
    """Whether this interpreter has every build-system requirement, at a version it allows."""
    try:
        import tomllib  # Python 3.11+; on 3.10 the isolated build fetches the backend
    except ModuleNotFoundError:
        return False
    from packaging.requirements import Requirement

    for spec in tomllib.loads(pyproject.read_text())["build-system"]["requires"]:
        requirement = Requirement(spec)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(version, prereleases=True):
            return False
    return True


def test_the_import_graph_has_no_cycle():
    report = cycle_report(read_modules())
    assert not report, "import cycles in pocketlm (each edge with the lines that import):\n" + "\n".join(report)


def test_no_underscore_name_crosses_a_module_boundary():
    violations, problems = underscore_report(read_modules())
    lines = [str(v) for v in violations] + problems
    assert not lines, f"{len(violations)} private names used across modules:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The detectors themselves, on small packages with known answers


def _toy(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_modules(tmp_path)


def test_modules_are_named_by_the_package_dir_mapping(tmp_path):
    modules = _toy(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/core/__init__.py": "",
            "runtime/core/model.py": "",
            "convert/__init__.py": "",
            "convert/core/errors.py": "",
        },
    )
    assert {n: (m.path, m.is_package) for n, m in modules.items()} == {
        "pocketlm": ("runtime/__init__.py", True),
        "pocketlm.core": ("runtime/core/__init__.py", True),
        "pocketlm.core.model": ("runtime/core/model.py", False),
        "pocketlm.converters": ("convert/__init__.py", True),
        "pocketlm.converters.core.errors": ("convert/core/errors.py", False),
    }


def test_the_graph_reads_every_kind_of_import(tmp_path):
    modules = _toy(
        tmp_path,
        {
            "runtime/__init__.py": "from pocketlm.core.model import Model\n",
            "runtime/core/__init__.py": "from . import model\nfrom .model import Model\n",
            "runtime/core/model.py": (
                "from __future__ import annotations\n"
                "from typing import TYPE_CHECKING\n"
                "import numpy as np\n"
                "if TYPE_CHECKING:\n"
                "    from .scheduler import Scheduler\n"
                "def run():\n"
                "    from ..loading import load\n"
                "    import pocketlm.core.text\n"
                "    return load\n"
            ),
            "runtime/core/scheduler.py": "try:\n    from .. import core\nexcept ImportError:\n    pass\n",
            "runtime/core/text.py": "from pocketlm.converters import api, __version__\nfrom .text import x\n",
            "runtime/loading/__init__.py": "",
            "runtime/loading/load.py": "from ...core import text\n",  # beyond the top: stays unresolved
            "convert/__init__.py": "from .api import convert\nfrom . import *\n",
            "convert/api.py": "import pocketlm.converters.core.errors as errors\n",
            "convert/core/errors.py": "",
        },
    )
    graph = import_graph(modules)
    assert {a: sorted(b) for a, b in graph.items() if b} == {
        "pocketlm": ["pocketlm.core.model"],
        "pocketlm.core": ["pocketlm.core.model"],
        "pocketlm.core.model": ["pocketlm.core.scheduler", "pocketlm.core.text", "pocketlm.loading.load"],
        "pocketlm.core.scheduler": ["pocketlm.core"],
        "pocketlm.core.text": ["pocketlm.converters", "pocketlm.converters.api"],
        "pocketlm.converters": ["pocketlm.converters.api"],
        "pocketlm.converters.api": ["pocketlm.converters.core.errors"],
    }
    assert graph["pocketlm.core.model"]["pocketlm.loading.load"] == [7]
    # pocketlm.core -> model -> scheduler -> core; the implicit parents (model's `import pocketlm.core.text`
    # runs pocketlm/__init__, which imports model) are not edges
    assert [format_cycle(c) for c in find_cycles(graph)] == [
        "pocketlm.core -> pocketlm.core.model -> pocketlm.core.scheduler -> pocketlm.core"
    ]


def test_cycles_are_found_through_type_checking_and_function_local_imports(tmp_path):
    files = {
        "runtime/__init__.py": "",
        "runtime/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pocketlm.b import B\n",
        "runtime/b.py": "def f():\n    from . import c\n",
        "runtime/c.py": "class C:\n    def g(self):\n        import pocketlm.a\n        from pocketlm.d import D\n",
        "runtime/d.py": "from .b import f\n",
        "runtime/e.py": "from pocketlm import a, b, c, d\n",  # only into the circle: not in one
    }
    modules = _toy(tmp_path, files)
    cycles = [format_cycle(c) for c in find_cycles(import_graph(modules))]
    assert cycles == [
        "pocketlm.a -> pocketlm.b -> pocketlm.c -> pocketlm.a",
        "pocketlm.b -> pocketlm.c -> pocketlm.d -> pocketlm.b",
    ]
    report = cycle_report(modules)
    assert report[0] == cycles[0] and "    runtime/c.py:4 imports pocketlm.d" in report
    # and a graph without a circle has none
    files["runtime/c.py"] = "class C:\n    pass\n"
    assert find_cycles(import_graph(_toy(tmp_path, files))) == []


TOY_OWNER = """\
import threading
from dataclasses import dataclass

_REGISTRY = {}


def _helper():
    return 1


@dataclass
class Engine:
    _budget: int = 0
    _limit = 4

    def __init__(self):
        self._lock = threading.Lock()
        self.__mangled = 1

    def _admit(self, other: "Engine"):
        other._lock.acquire()      # defined here (self._lock =): allowed
        return other._budget + self._secret   # self: allowed whatever it is


class Raw:
    pass


Raw._fields_ = []                  # an attribute of its own class
print(Raw._fields_, Engine()._limit, _helper.__name__)
"""

TOY_USER = """\
import pickle
import pocketlm.owner as owner
from pocketlm.owner import Engine, _helper
from . import _REGISTRY
from .owner import __doc__
from llama_cpp._ggml import base


class Mine(pickle._Unpickler):
    def __init__(self):
        self._own = 1

    def go(self, engine: Engine):
        engine._admit(self)
        with engine._lock:
            pass
        engine._lock = None
        owner._REGISTRY.clear()
        getattr(engine, "_budget", None)
        setattr(engine, "_budget", 2)
        getattr(engine, "budget")
        super()._own
        return self._anything, self.__dict__, engine.__class__, type(engine)._limit


def solo(other):
    return other._own
"""


def test_private_names_are_found_wherever_they_cross(tmp_path):
    files = {"runtime/__init__.py": "", "runtime/owner.py": TOY_OWNER, "runtime/user.py": TOY_USER}
    modules = _toy(tmp_path, {**files, "runtime/third.py": "from pocketlm.owner import _gone\n"})
    assert [str(u) for u in underscore_uses(modules)] == [
        "runtime/third.py:1: _gone",
        "runtime/user.py:3: _helper",
        "runtime/user.py:4: _REGISTRY",
        "runtime/user.py:6: _ggml",
        "runtime/user.py:9: _Unpickler",
        "runtime/user.py:14: _admit",
        "runtime/user.py:15: _lock",
        "runtime/user.py:17: _lock",
        "runtime/user.py:18: _REGISTRY",
        "runtime/user.py:19: _budget",
        "runtime/user.py:20: _budget",
        "runtime/user.py:23: _limit",
    ]
    assert {"_REGISTRY", "_helper", "_budget", "_limit", "_lock", "_admit", "_fields_", "__mangled"} <= (
        defined_names(modules["pocketlm.owner"].tree)
    )
    # the allow-list: third-party names pass, a stale entry and one naming pocketlm's own name are refused
    allowed = {
        ("pocketlm.user", "_Unpickler"): "pickle's",
        ("pocketlm.user", "_ggml"): "llama_cpp's",
        ("pocketlm.user", "_gone"): "no longer used",
        ("pocketlm.user", "_lock"): "pocketlm's own",
        ("pocketlm.third", "_gone"): "imported from pocketlm: never excused",
    }
    violations, problems = underscore_report(modules, allowed)
    assert [str(v) for v in violations] == [
        "runtime/third.py:1: _gone",
        "runtime/user.py:3: _helper",
        "runtime/user.py:4: _REGISTRY",
        "runtime/user.py:14: _admit",
        "runtime/user.py:15: _lock",
        "runtime/user.py:17: _lock",
        "runtime/user.py:18: _REGISTRY",
        "runtime/user.py:19: _budget",
        "runtime/user.py:20: _budget",
        "runtime/user.py:23: _limit",
    ]
    assert problems == [
        "allow-list entry ('pocketlm.user', '_gone') is not used any more: remove it",
        "allow-list entry ('pocketlm.third', '_gone') is not used any more: remove it",
        "allow-list entry ('pocketlm.user', '_lock') names a private name pocketlm defines",
    ]


def main() -> int:
    """Print every current violation: import cycles, then private names used across modules."""
    modules = read_modules()
    cycles = cycle_report(modules)
    violations, problems = underscore_report(modules)
    print(f"import cycles: {sum(not line.startswith(' ') for line in cycles)}")
    for line in cycles:
        print(line)
    print(f"\nprivate names used across modules: {len(violations)} uses of {len({v.name for v in violations})} names")
    by_file: dict[str, list[Use]] = {}
    for use in violations:
        by_file.setdefault(use.path, []).append(use)
    for path, uses in by_file.items():
        print(f"{path}: {', '.join(sorted({u.name for u in uses}))}")
        for use in uses:
            print(f"    {use}")
    for problem in problems:
        print(problem)
    return 1 if cycles or violations or problems else 0


if __name__ == "__main__":
    sys.exit(main())
