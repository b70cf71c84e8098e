"""Shared by speed_bench.py and fidelity_bench.py: run settings, child-process jobs, the
converted models they measure, the benchmark text, and small statistics.

This module is imported by the measuring (parent) process, which must stay small (see
common.peak_rss): it imports nothing heavier than numpy. Everything that loads a model runs
in a child process: `python <script> --job '<json>'`, which prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
from common import CACHE, HERE, ROOT, config, ensure_checkpoint, peak_rss

ARTIFACTS = CACHE / "artifacts"
TEXT = HERE / "data" / "multilingual.txt"
TEXT_VOCAB = 1024  # the benchmark text's token ids all fall below this (see text_ids)
THREADS = 2
MIB = 2**20
SEQ2SEQ = ("flan-t5-small", "mt0-large")
REAL_SHAPES = ("bloomz-560m", "flan-t5-small", "mt0-large")


def is_seq2seq(model: str) -> bool:
    return model in SEQ2SEQ or "t5" in model


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much to measure. `quick` is for development (noisy, minutes); full is for reports."""

    quick: bool
    prompt_tokens: int  # batch-1 prompt length
    new_tokens: int  # batch-1 decode length (EOS ignored: min_new_tokens = max_new_tokens)
    warmup_new_tokens: int  # one unmeasured generation per process first (page faults, allocators)
    batch_prompts: int  # the T5 batched figure
    batch_new_tokens: int
    batch_processes: int  # the batched figure: fewer processes (its peak RSS matters less),
    batch_runs: int  #   more runs each
    processes: int  # fresh processes per variant: load time and peak RSS are medians over them
    runs: int  # measured generations per process: speeds are medians over processes x runs
    overhead_runs: int  # interleaved PocketLM / direct-engine pairs
    import_repeats: int
    fidelity_positions: int  # predicted tokens per model for KL / top-1 / perplexity
    child_timeout_s: int  # a child still running after this is killed and its variant reported as timed out
    threads: int = THREADS

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


QUICK = Settings(
    True,
    prompt_tokens=32,
    new_tokens=16,
    warmup_new_tokens=4,
    batch_prompts=16,
    batch_new_tokens=8,
    batch_processes=1,
    batch_runs=1,
    processes=1,
    runs=1,
    overhead_runs=3,
    import_repeats=3,
    fidelity_positions=1024,
    child_timeout_s=900,
)
FULL = Settings(
    False,
    prompt_tokens=128,
    new_tokens=64,
    warmup_new_tokens=8,
    batch_prompts=16,
    batch_new_tokens=32,
    batch_processes=1,
    batch_runs=3,
    processes=3,
    runs=2,
    overhead_runs=7,
    import_repeats=7,
    fidelity_positions=4096,
    child_timeout_s=2400,
)


def settings(quick: bool) -> Settings:
    return QUICK if quick else FULL


# -- variants and the files they run --------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of running a model: the baseline (transformers fp32), a PocketLM file, or
    PocketLM given the checkpoint folder itself (format "hf": it converts once, then runs
    whatever it picks)."""

    model: str
    engine: str  # "transformers" | "pocketlm"
    format: str = "hf"  # hf | gguf | ct2
    quant: str = "fp32"  # file quant type ("auto" for a checkpoint folder given to PocketLM)
    compute_type: str | None = None  # CTranslate2 compute type given to pocketlm.load (None: its pick)
    omp_wait_policy: str | None = None  # OMP_WAIT_POLICY for the child (torch's OpenMP threads)

    @property
    def label(self) -> str:
        if self.engine == "transformers":
            return "transformers fp32" + (f" (OMP_WAIT_POLICY={self.omp_wait_policy})" if self.omp_wait_policy else "")
        if self.is_auto:
            return "pocketlm.load(checkpoint folder): its own pick"
        if self.format == "ct2":
            return f"ct2 {self.quant} file, compute {self.compute_type or 'auto'}"
        return f"gguf {self.quant}"

    @property
    def env(self) -> dict[str, str]:
        return {"OMP_WAIT_POLICY": self.omp_wait_policy} if self.omp_wait_policy else {}

    @property
    def is_auto(self) -> bool:
        return self.engine == "pocketlm" and self.format == "hf"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        return cls(**{k: v for k, v in d.items() if k != "label"})


class ArtifactError(RuntimeError):
    """A conversion that failed: the variant is reported unavailable with this message."""


TRAINED = CACHE / "trained"  # benchmarks/reference_models.py's trained checkpoints


def artifact_path(model: str, fmt: str, quant: str, output_type: str | None = None, imatrix: bool = False) -> Path:
    if fmt != "gguf":
        return ARTIFACTS / f"{model}.ct2-{quant}"
    head = f"-head_{output_type}" if output_type else ""
    return ARTIFACTS / f"{model}.{quant}{head}{'-imatrix' if imatrix else ''}.gguf"


def source_folder(model: str) -> Path:
    """The Hugging Face checkpoint folder of a model: trained (reference_models.py, built
    there), small (built by a benchmark), or real-shape (built here once)."""
    for folder in (TRAINED / model, CACHE / "small" / model):
        if folder.is_dir():
            return folder
    return ensure_checkpoint(model)


def artifact(
    model: str,
    fmt: str,
    quant: str,
    rebuild: bool = False,
    output_type: str | None = None,
    imatrix: Path | None = None,
) -> Path:
    """The converted file for (model, format, quant[, head type, importance matrix]),
    converted once by `python -m pocketlm.converters` in a child process and cached under
    results/cache/artifacts/ (--rebuild converts again)."""
    out = artifact_path(model, fmt, quant, output_type, imatrix is not None)
    src = source_folder(model)
    inputs = [p for p in (src / "config.json", imatrix) if p is not None and p.exists()]
    if out.exists() and not rebuild and all(out.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        return out  # converted after its checkpoint (a retrained model converts again) and matrix
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pocketlm.converters",
        str(src),
        "-o",
        str(out),
        "--format",
        fmt,
        "--quant",
        quant,
        "--force",
        "--json",
        "--threads",
        str(THREADS),
    ]
    cmd += ["--output-type", output_type] if output_type else []
    cmd += ["--imatrix", str(imatrix)] if imatrix else []
    extra = f"{f', head {output_type}' if output_type else ''}{', imatrix' if imatrix else ''}"
    print(f"  converting {model} -> {fmt} {quant}{extra}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT)
    if proc.returncode:
        lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
        raise ArtifactError(lines[-1][:300] if lines else f"convert exited with {proc.returncode}")
    return out


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file in a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def checkpoint_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


# -- child processes ----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment every child runs in: offline, quiet, the same threads, no home caches."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        POCKETLM_CACHE=str(CACHE / "pocketlm"),
        # compiled bytecode kept out of the source tree, but kept: import times are warm
        PYTHONPYCACHEPREFIX=str(CACHE / "pycache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


@dataclass
class ChildResult:
    result: dict[str, Any]
    seconds: float
    peak_rss: int


def run_child(
    script: Path, job: dict[str, Any], env: dict[str, str] | None = None, timeout_s: int | None = None
) -> ChildResult:
    """Run one job in a fresh `python script --job JSON` (child_env() plus `env`); its peak
    RSS is measured by wait4. With `timeout_s` the child runs under coreutils `timeout`
    (wait4 still reports the child's peak: a process's rusage includes its reaped children)."""
    cmd = [sys.executable, str(script), "--job", json.dumps(job)]
    if timeout_s and shutil.which("timeout"):
        cmd = ["timeout", str(timeout_s)] + cmd
    try:
        seconds, rss, out = peak_rss(cmd, env=child_env() | (env or {}))
    except RuntimeError as e:
        if f"failed ({124 << 8})" in str(e):
            raise RuntimeError(f"timed out after {timeout_s} s") from None
        raise
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"job {job.get('kind')} printed no result:\n{out[-2000:]}")
    return ChildResult(json.loads(lines[-1]), seconds, rss)


def child_main(jobs: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """In a child (`--job JSON` on the command line): run the job, print its JSON, return True."""
    if len(sys.argv) != 3 or sys.argv[1] != "--job":
        return False
    job = json.loads(sys.argv[2])
    result = jobs[job["kind"]](job)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return True


def error_line(e: BaseException) -> str:
    """The last meaningful line of an error, for a table cell: no exception class prefix,
    file names instead of absolute paths."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else type(e).__name__
    line = re.sub(r"^[\w.]+(Error|Exception): ", "", line)
    return re.sub(r"/\S+/([^/\s]+)", r"\1", line)[:300]


# -- the benchmark text -------------------------------------------------------------------


def text_ids() -> list[int]:
    """Token ids of benchmarks/data/multilingual.txt, the same for every model.

    The real-shape checkpoints carry stand-in tokenizers (T5's cannot spell real words), so
    the text is tokenized once with a byte-level BPE of 1024 ids trained on the text itself
    (BLOOM's pre-tokenizer, pocketlm.converters.synthetic): natural-text token statistics, ids valid in
    every model's vocabulary. Cached next to the text's sha256."""
    text = TEXT.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cached = CACHE / f"text_ids.{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from pocketlm.converters.synthetic import train_bloom_tokenizer

    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    ids = train_bloom_tokenizer(paragraphs, TEXT_VOCAB).encode(text).ids
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(ids))
    return ids


def prompt(ids: list[int], length: int, index: int, eos: int | None = None) -> list[int]:
    """Prompt number `index`: a window of the text, different for every index (so an engine's
    prefix cache never reuses a previous prompt), ending with `eos` when given (T5 inputs)."""
    start = (index * 211) % len(ids)
    window = [ids[(start + i) % len(ids)] for i in range(length - (eos is not None))]
    return window + ([eos] if eos is not None else [])


def batch_prompts(ids: list[int], count: int, base: int, first: int, eos: int | None) -> list[list[int]]:
    """`count` prompts of varied lengths (base/2 to 3*base/2, so padding matters), numbered
    from `first`."""
    return [prompt(ids, base // 2 + (i * base) // max(count - 1, 1), first + i, eos) for i in range(count)]


# -- statistics ---------------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values: Iterable[float]) -> float | None:
    """(max - min) / median: how noisy a set of samples is."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def model_config(model: str) -> dict[str, Any]:
    """config.json of a real-shape, small or trained model."""
    for built in (TRAINED / model / "config.json", CACHE / "small" / model / "config.json"):
        if built.is_file():
            return json.loads(built.read_text())
    return config(model)


# -- results ------------------------------------------------------------------------------


def machine_details() -> dict[str, Any]:
    """CPU model, cores and RAM, next to common.machine()'s platform line."""
    details: dict[str, Any] = {"cpu": None, "ram_gib": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                details["cpu"] = line.split(":", 1)[1].strip()
                break
        details["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    details["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return details


def previous_result(name: str, mode: str) -> dict[str, Any] | None:
    """results/<name>.json from an earlier run in the same mode (for --keep-others)."""
    path = common.RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("mode") == mode else None


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """results/<name>.json (common.write_result adds the machine), with a timestamp."""
    import time

    return common.write_result(name, {"date": time.strftime("%Y-%m-%d %H:%M"), **payload})
