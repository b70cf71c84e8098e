"""Python overhead per generated token and import time, before vs after a change (issue 26).

    .venv/bin/python benchmarks/overhead_bench.py                   # a0982da vs the working tree
    .venv/bin/python benchmarks/overhead_bench.py --before REF      # another "before"
    .venv/bin/python benchmarks/overhead_bench.py --after REF       # a commit instead of the working tree
    .venv/bin/python benchmarks/overhead_bench.py --quick           # fewer rounds: checks the script, noisy

"Before" is a detached git worktree of REF in .cache/overhead-before-<sha> (made once, reused);
"after" is the working tree (or a worktree of --after REF). Both are measured in the same run,
in alternating order (before, after, after, before, ...), every measurement in a fresh child
process whose PYTHONPATH and cwd are its tree, so the two versions never share a process. The
child imports `pocketlm` or, failing that, `runtime`, whichever resolves inside its tree (the
venv's editable install would hand a "before" child the working tree's `pocketlm`), and the
parent checks the child's `api.__file__` and that every module of the package came from that tree.

The model is a tiny random BLOOM (hidden 64, 2 layers, vocabulary 512) converted to GGUF f32 by
the "before" tree's converter, cached in benchmarks/results/cache/. Its engine steps cost little,
so the time per token is mostly the Python around them: `load(path, threads=1, parallel=P)`,
one warm-up, then `generate(prompt ids, max_new_tokens=N, min_new_tokens=N)` (greedy) and the same
with N=1, in turn. Per token = (t(N) - t(1)) / (tokens(N) - tokens(1)): the decode loop's cost
without the prompt and the call's fixed costs; also reported: the whole call / its tokens.
Import: wall time of `python -c "import <name>"` in fresh interpreters, and `-X importtime`'s
cumulative time for the package. Results: benchmarks/results/overhead.json, then report.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "results" / "cache"
DEFAULT_BEFORE = "a0982da"
MARK = "OVERHEAD_JSON "
PACKAGES = ("pocketlm", "runtime", "convert")  # top-level names either version may load
# the tiny model: parameters of build_random_bloom (the cache key)
MODEL = {"hidden": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "seed": 0, "std": 0.2}
PROMPT_TOKENS = 32
# (label, parallel, requests decoded together)
CONFIGS = [("parallel=1, 1 request", 1, 1), ("parallel=4, 1 request", 4, 1), ("parallel=4, 4 requests", 4, 4)]


# A tree whose pyproject maps import names to folders (setuptools package-dir: `pocketlm` =
# runtime/) is importable under those names only through an install; the venv's editable one
# serves the working tree. Children of any other tree run this first: a finder, ahead of the
# others, that maps the names to that tree's folders. (Tiny: the import times stay comparable.)
BOOT = """import sys, importlib.util as _u
_M = {mapping!r}
class _F:
    @staticmethod
    def find_spec(name, path=None, target=None):
        d = _M.get(name)
        return d and _u.spec_from_file_location(name, d + '/__init__.py', submodule_search_locations=[d])
sys.meta_path.insert(0, _F)
"""


def package_dirs(root: Path) -> dict[str, str]:
    """pyproject's [tool.setuptools] package-dir of the tree, names to absolute folders."""
    try:
        import tomllib

        data = tomllib.loads((root / "pyproject.toml").read_text())
    except (ImportError, OSError, ValueError):
        return {}
    dirs = data.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: str(root / folder) for name, folder in dirs.items()}


# -- the child side (runs inside one tree; stdlib only until the package is imported) ------------


def _under(path: str | os.PathLike, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _resolve(root: Path, names: tuple[str, ...]) -> str:
    """The first of `names` whose package resolves inside `root`, found without importing it:
    `import pocketlm` in a "before" child would otherwise run the editable install's (current)
    code; in the "after" tree, whose folder may still be runtime/ (mapped to `pocketlm` by the
    editable install), `runtime` would import the same files under the old name."""
    import importlib.util

    seen = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        seen.append(f"{name}: {origin or 'not found'}")
        if origin and origin not in ("namespace", "built-in") and _under(origin, root):
            return name
    raise SystemExit(f"no package of {names} resolves inside {root} ({'; '.join(seen)})")


def _foreign_modules(root: Path) -> list[str]:
    """Modules of the project's packages that this process loaded from outside `root`."""
    out = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.split(".")[0] in PACKAGES and file and not _under(file, root):
            out.append(f"{name} ({file})")
    return out


def _import_api(root: Path) -> tuple[Any, str]:
    import importlib

    name = _resolve(root, ("pocketlm", "runtime"))
    return importlib.import_module(name), name


def _emit(payload: dict[str, Any]) -> None:
    print(MARK + json.dumps(payload), flush=True)


def child_resolve(root: Path, task: dict[str, Any]) -> None:
    api, name = _import_api(root)
    _emit({"name": name, "file": api.__file__, "foreign": _foreign_modules(root)})


def child_build(root: Path, task: dict[str, Any]) -> None:
    """The tiny GGUF, with this tree's converter (the "before" one: independent of the new layout)."""
    import importlib

    top = _resolve(root, ("convert", "pocketlm.converters"))
    synthetic = importlib.import_module(f"{top}.synthetic")
    convert = importlib.import_module(top).convert
    dest = Path(task["path"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".overhead-build-") as tmp:
        folder = synthetic.build_random_bloom(Path(tmp) / "hf", **task["model"])
        out = convert(folder, Path(tmp) / dest.name, quant="f32").output
        os.replace(out, dest)
    _emit({"path": str(dest), "built_by": top, "foreign": _foreign_modules(root)})


def _timed(model: Any, prompts: list[list[int]], new: int, label: str) -> tuple[float, float, list[Any]]:
    """Wall and CPU seconds of one call generating exactly `new` tokens for each prompt, and its results."""
    opts = {"max_new_tokens": new, "min_new_tokens": new}
    started, cpu = time.perf_counter(), time.process_time()
    if len(prompts) == 1:
        results = [model.generate(prompts[0], **opts)]
    elif hasattr(model, "generate_batch"):
        results = model.generate_batch(prompts, **opts)
    else:
        results = model.generate(prompts, **opts)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if [len(r.token_ids) for r in results] != [new] * len(prompts):
        raise SystemExit(f"{label}: asked {new} tokens, got {[len(r.token_ids) for r in results]}")
    return seconds, cpu, results


def child_overhead(root: Path, task: dict[str, Any]) -> None:
    import inspect

    api, name = _import_api(root)
    params = inspect.signature(api.load).parameters
    missing = [p for p in ("threads", "parallel") if p not in params]
    if missing:  # **backend_options would swallow them silently
        raise SystemExit(f"{name}.load() has no parameter {missing}: adapt overhead_bench.child_overhead")
    n, repeats = task["new_tokens"], task["repeats"]
    out: dict[str, Any] = {"name": name, "file": api.__file__, "configs": {}}
    for label, parallel, requests in task["configs"]:
        prompts = [[10 + k + i for i in range(task["prompt_tokens"])] for k in range(requests)]
        with api.load(task["path"], threads=1, parallel=parallel) as model:
            warm = _timed(model, prompts, n, label)[2]  # warm-up: first-call costs, caches
            _timed(model, prompts, 1, label)
            longs, shorts = [], []
            for _ in range(repeats):
                longs.append(_timed(model, prompts, n, label))
                shorts.append(_timed(model, prompts, 1, label))
        t_n, t_1 = statistics.median(x[0] for x in longs), statistics.median(x[0] for x in shorts)
        c_n, c_1 = statistics.median(x[1] for x in longs), statistics.median(x[1] for x in shorts)
        tokens = n * requests
        ids = json.dumps([r.token_ids for r in warm]).encode()
        out["configs"][label] = {
            "per_token_us": (t_n - t_1) / (tokens - requests) * 1e6,
            "cpu_per_token_us": (c_n - c_1) / (tokens - requests) * 1e6,
            "call_per_token_us": t_n / tokens * 1e6,
            "one_token_call_ms": t_1 * 1e3,
            "call_ms": t_n * 1e3,
            "tokens_sha": hashlib.sha256(ids).hexdigest()[:16],
        }
    out["foreign"] = _foreign_modules(root)
    out["packages"] = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in PACKAGES})
    _emit(out)


def child_main(root: str, task_json: str) -> int:
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        del sys.path[0]  # benchmarks/ is not part of either version
    task = json.loads(task_json)
    if task.get("boot") is not None:
        exec(BOOT.format(mapping=task["boot"]), {})
    {"resolve": child_resolve, "build": child_build, "overhead": child_overhead}[task["kind"]](Path(root), task)
    return 0


# -- the parent side -------------------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Tree:
    """One version of the code: a worktree of a commit, or the working tree."""

    def __init__(self, role: str, root: Path, sha: str, dirty: bool, label: str):
        self.role, self.root, self.sha, self.dirty, self.label = role, root, sha, dirty, label
        self.name = ""  # the import name, once resolved
        self.packages: set[str] = set()  # the project's top-level names its children loaded
        self.dirs = package_dirs(root)
        self.path = [self.dirs.pop("")] if "" in self.dirs else []  # a src layout: `"" = "src"`
        self.needs_boot = bool(self.dirs) and root != ROOT  # else importable as it is (editable install)
        self.boot = False  # whether its children run BOOT: both sides do when either needs it

    def prelude(self) -> str:
        """What a `python -c` child runs before its own code."""
        return BOOT.format(mapping=self.dirs) if self.boot else ""

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("POCKETLM_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")
        }
        env.update(
            PYTHONPATH=os.pathsep.join([*self.path, str(self.root)]),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        return env

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def child(self, task: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        task = {**task, "boot": self.dirs if self.boot else None}
        proc = self.run([str(Path(__file__).resolve()), "--child", str(self.root), json.dumps(task)], timeout)
        lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
        if proc.returncode or not lines:
            tail = proc.stderr[-3000:] + proc.stdout[-1000:]
            raise RuntimeError(f"{self.role} child ({task['kind']}) failed ({proc.returncode}):\n{tail}")
        result = json.loads(lines[-1][len(MARK) :])
        if result.get("foreign"):
            raise RuntimeError(f"{self.role} child loaded modules from outside {self.root}: {result['foreign']}")
        if "file" in result and not _under(result["file"], self.root):
            raise RuntimeError(f"{self.role} child imported {result['file']}, outside {self.root}")
        return result


def worktree(ref: str, role: str, reuse: dict[str, Path]) -> Tree:
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = reuse.get(sha) or ROOT / ".cache" / f"overhead-{role}-{sha[:7]}"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        if subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode:
            raise SystemExit(f"{path} is not git-ignored: refusing to put a worktree there")
        print(f"git worktree add --detach {path} {sha[:7]}", flush=True)
        git("worktree", "add", "--detach", str(path), sha)
    elif git("rev-parse", "HEAD", cwd=path) != sha:
        raise SystemExit(f"{path} is not at {sha[:7]}: remove it (git worktree remove {path}) and run again")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", cwd=path))
    reuse[sha] = path
    return Tree(role, path, sha, dirty, f"{ref} ({sha[:7]})")


def working_tree() -> Tree:
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Tree("after", ROOT, sha, dirty, f"working tree ({sha[:7]}{', with changes' if dirty else ''})")


def tiny_model(builder: Tree, rebuild: bool) -> Path:
    key = "-".join(f"{k}{v}" for k, v in MODEL.items())
    path = CACHE / f"overhead-bloom-{key}-f32.gguf"
    if rebuild or not path.is_file():
        print(f"building {path.name} with {builder.label}'s converter", flush=True)
        builder.child({"kind": "build", "path": str(path), "model": MODEL})
    return path


def alternate(rounds: int, trees: list[Tree]) -> list[Tree]:
    """before, after, after, before, ...: a linear drift weighs on both alike."""
    out: list[Tree] = []
    for i in range(rounds):
        out += trees if i % 2 == 0 else trees[::-1]
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_overhead(trees: list[Tree], path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per-config medians over the rounds, each side's, and after / before."""
    task = {
        "kind": "overhead",
        "path": str(path),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prompt_tokens": PROMPT_TOKENS,
        "configs": CONFIGS,
    }
    runs: dict[str, list[dict[str, Any]]] = {t.role: [] for t in trees}
    for i, tree in enumerate(alternate(args.rounds, trees)):
        r = tree.child(task)
        runs[tree.role].append(r)
        tree.packages.update(r["packages"])
        first = next(iter(r["configs"].values()))
        print(f"  round {i // 2 + 1} {tree.role}: {first['per_token_us']:.1f} us/token (parallel=1)", flush=True)
    out: dict[str, Any] = {}
    for label, parallel, requests in CONFIGS:
        row: dict[str, Any] = {"parallel": parallel, "requests": requests}
        for tree in trees:
            cells = [r["configs"][label] for r in runs[tree.role]]
            row[tree.role] = {
                key: median([c[key] for c in cells])
                for key in ("per_token_us", "cpu_per_token_us", "call_per_token_us", "one_token_call_ms", "call_ms")
            }
            row[tree.role]["per_token_us_rounds"] = [round(c["per_token_us"], 2) for c in cells]
            row[tree.role]["best_per_token_us"] = min(c["per_token_us"] for c in cells)  # least disturbed
            row[tree.role]["tokens_sha"] = sorted({c["tokens_sha"] for c in cells})
        b, a = row["before"], row["after"]
        row["ratio"] = a["per_token_us"] / b["per_token_us"]
        row["cpu_ratio"] = a["cpu_per_token_us"] / b["cpu_per_token_us"]
        row["best_ratio"] = a["best_per_token_us"] / b["best_per_token_us"]
        row["call_ratio"] = a["call_per_token_us"] / b["call_per_token_us"]
        paired = [x / y for x, y in zip(a["per_token_us_rounds"], b["per_token_us_rounds"])]  # in run order
        row["paired_ratio_range"] = [round(min(paired), 3), round(max(paired), 3)]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        row["paired_ratio_quartiles"] = [round(quartiles[0], 3), round(quartiles[2], 3)]
        row["same_tokens"] = a["tokens_sha"] == b["tokens_sha"]
        out[label] = row
    return out


def importtime_us(stderr: str, name: str) -> float | None:
    """-X importtime's cumulative microseconds for the top-level package `name`."""
    for line in stderr.splitlines():
        m = re.match(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)\s*$", line)
        if m and m.group(4) == name and len(m.group(3)) == 1:
            return float(m.group(2))
    return None


def import_statements(name: str) -> dict[str, str]:
    """What is timed: the import alone, and the import plus the name a caller uses first (a lazy
    package pays for `load` there, at first use)."""
    return {"import": f"import {name}", "import_load": f"import {name}; {name}.load"}


def timed_import(tree: Tree, code: str) -> float:
    started = time.perf_counter()
    proc = tree.run(["-c", tree.prelude() + code])
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{tree.role}: {code} failed:\n{proc.stderr[-2000:]}")
    return seconds


def measure_import(trees: list[Tree], args: argparse.Namespace) -> dict[str, Any]:
    for tree in trees:  # unmeasured: writes the bytecode
        for code in import_statements(tree.name).values():
            timed_import(tree, code)
    wall: dict[str, dict[str, list[float]]] = {t.role: {k: [] for k in import_statements("x")} for t in trees}
    bare: list[float] = []
    for i, tree in enumerate(alternate(args.import_repeats, trees)):
        for key, code in import_statements(tree.name).items():
            wall[tree.role][key].append(timed_import(tree, code))
        if i % 2:
            started = time.perf_counter()
            tree.run(["-c", "pass"])
            bare.append(time.perf_counter() - started)
    cumulative: dict[str, list[float]] = {t.role: [] for t in trees}
    for tree in alternate(args.importtime_repeats, trees):
        proc = tree.run(["-X", "importtime", "-c", tree.prelude() + f"import {tree.name}"])
        us = importtime_us(proc.stderr, tree.name)
        if us is not None:
            cumulative[tree.role].append(us)
    out: dict[str, Any] = {"interpreter_ms": median(bare) * 1e3}
    for tree in trees:
        statements = import_statements(tree.name)
        out[tree.role] = {
            "statement": statements["import"],
            "wall_ms": median(wall[tree.role]["import"]) * 1e3,
            "wall_ms_samples": [round(x * 1e3, 1) for x in wall[tree.role]["import"]],
            "load_statement": statements["import_load"],
            "load_wall_ms": median(wall[tree.role]["import_load"]) * 1e3,
            "load_wall_ms_samples": [round(x * 1e3, 1) for x in wall[tree.role]["import_load"]],
            "importtime_ms": median(cumulative[tree.role]) / 1e3 if cumulative[tree.role] else None,
        }
    b, a, bare_ms = out["before"], out["after"], out["interpreter_ms"]
    out["ratio"] = a["wall_ms"] / b["wall_ms"]
    out["net_ratio"] = (a["wall_ms"] - bare_ms) / (b["wall_ms"] - bare_ms)
    out["load_ratio"] = a["load_wall_ms"] / b["load_wall_ms"]
    if a["importtime_ms"] and b["importtime_ms"]:
        out["importtime_ratio"] = a["importtime_ms"] / b["importtime_ms"]
    return out


def print_table(result: dict[str, Any]) -> None:
    b, a = result["before"], result["after"]
    print(f"\nbefore: {b['label']} (import {b['import_name']})\nafter:  {a['label']} (import {a['import_name']})")
    print(f"{'measurement':<56} {'before':>10} {'after':>10} {'after/before':>13}")
    for label, row in result["overhead"].items():
        for key, what, ratio_key in (
            ("per_token_us", "us per new token", "ratio"),
            ("cpu_per_token_us", "CPU us per new token", "cpu_ratio"),
            ("best_per_token_us", "us per new token, fastest process", "best_ratio"),
            ("call_per_token_us", "whole call / tokens, us", "call_ratio"),
        ):
            ratio = row[ratio_key]
            print(f"{label + ': ' + what:<56} {row['before'][key]:>10.1f} {row['after'][key]:>10.1f} {ratio:>12.3f}x")
    imp = result["import"]
    print(
        f"{'import, wall ms (fresh interpreter)':<56} {imp['before']['wall_ms']:>10.1f} "
        f"{imp['after']['wall_ms']:>10.1f} {imp['ratio']:>12.3f}x"
    )
    print(
        f"{'import and .load, wall ms (fresh interpreter)':<56} {imp['before']['load_wall_ms']:>10.1f} "
        f"{imp['after']['load_wall_ms']:>10.1f} {imp['load_ratio']:>12.3f}x"
    )
    if "importtime_ratio" in imp:
        print(
            f"{'import, -X importtime cumulative ms':<56} {imp['before']['importtime_ms']:>10.1f} "
            f"{imp['after']['importtime_ms']:>10.1f} {imp['importtime_ratio']:>12.3f}x"
        )
    for side in (b, a):
        if len(side["packages_loaded"]) > 1 and "pocketlm" in side["packages_loaded"]:
            print(f"warning: {side['label']} loaded {side['packages_loaded']}: modules imported under old names too")
    same = all(r["same_tokens"] for r in result["overhead"].values())
    print(f"bare interpreter {imp['interpreter_ms']:.1f} ms; same greedy tokens before and after: {same}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=DEFAULT_BEFORE, help=f"git ref of the code before (default {DEFAULT_BEFORE})")
    p.add_argument("--after", default=None, help="git ref of the code after (default: the working tree)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 6 imports: checks the script, noisy")
    p.add_argument("--rounds", type=int, default=None, help="child processes per version (default 20)")
    p.add_argument("--repeats", type=int, default=10, help="timed generations of each length per child")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--import-repeats", type=int, default=None, help="fresh interpreters per version (default 20)")
    p.add_argument("--rebuild", action="store_true", help="build the tiny model again")
    p.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 20)
    args.import_repeats = args.import_repeats or (6 if args.quick else 20)
    args.importtime_repeats = 3 if args.quick else 7
    started, load_start = time.perf_counter(), os.getloadavg()

    shared: dict[str, Path] = {}
    before = worktree(args.before, "before", shared)
    after = working_tree() if args.after is None else worktree(args.after, "after", shared)
    trees = [before, after]
    for tree in trees:
        tree.boot = any(t.needs_boot for t in trees)
    for tree in trees:
        r = tree.child({"kind": "resolve"})
        tree.name = r["name"]
        print(f"{tree.role}: {tree.label}: import {tree.name} -> {r['file']}", flush=True)
    path = tiny_model(before, args.rebuild)

    print(f"per-token overhead: {args.rounds} rounds x {len(trees)} versions, N={args.new_tokens}", flush=True)
    overhead = measure_overhead(trees, path, args)
    print(f"import time: {args.import_repeats} rounds x {len(trees)} versions", flush=True)
    imp = measure_import(trees, args)

    import common  # benchmarks/common.py: the machine line
    import harness

    result = {
        "command": "python benchmarks/overhead_bench.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if args.quick else "full",
        "machine_details": harness.machine_details(),
        "model": {**MODEL, "quant": "f32", "file": path.name, "file_bytes": path.stat().st_size},
        "settings": {
            "threads": 1,
            "new_tokens": args.new_tokens,
            "prompt_tokens": PROMPT_TOKENS,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "import_repeats": args.import_repeats,
            "importtime_repeats": args.importtime_repeats,
        },
        **{
            t.role: {
                "commit": t.sha,
                "dirty": t.dirty,
                "label": t.label,
                "import_name": t.name,
                "packages_loaded": sorted(t.packages),
                "import_finder": t.boot,
            }
            for t in trees
        },
        "overhead": overhead,
        "import": imp,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    result["before"]["ref"] = args.before
    result["after"]["ref"] = args.after or "working tree"
    print(f"wrote {common.write_result('overhead', result)} in {result['wall_s']:.0f} s")
    print_table(result)
    if not args.no_report:
        import report

        report.main([])
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1:]))
