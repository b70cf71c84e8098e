"""Conversion at the scale of the family's large members (issue 29, item 3): time, peak RSS and
peak bytes on disk of PocketLM's converter beside llama.cpp's and CTranslate2's own.

A random checkpoint of each shape's published config is generated once, tensor by tensor, as
bf16 safetensors shards with a `model.safetensors.index.json` (bloomz-7b1: 14 GB, T0pp: 22 GB;
neither fits in RAM as float32), cached in results/cache/<shape>-shape-bf16/ and reused. Then
each conversion runs in fresh child processes, one after the other, never two at once:

  BLOOM shapes   pocketlm-q4_k_m, pocketlm-q8_0   `pocketlm convert --quant ...` (GGUF)
                 llama.cpp-q4_k_m, llama.cpp-q8_0  llama.cpp's `convert_hf_to_gguf.py --outtype bf16`
                                                   (lossless for a bf16 checkpoint), then
                                                   `llama-quantize` of that file: its usual two steps
                 llama.cpp-q8_0-direct (not run unless named in --only)  `convert_hf_to_gguf.py
                                                   --outtype q8_0`: its converter's own one-step q8_0
  T5 shapes      pocketlm-int8                    `pocketlm convert --format ct2 --quant int8`
                 ctranslate2-int8                 `ct2-transformers-converter --quantization int8`
                                                   (loads the whole model through transformers)

While a conversion runs, every 0.5 s: the RSS of its process tree (summed over the processes of
its session; anonymous memory apart, since mapped checkpoint pages are file-backed and
reclaimable) and the bytes on disk of its output folder and of a dedicated TMPDIR (allocated
blocks, plus files the tree holds open after deleting them), the intermediate GGUF of llama.cpp's
two steps included. Peak RSS is the larger of the polled sum and wait4's ru_maxrss. Each
conversion starts with the checkpoint's pages out of the page cache (posix_fadvise DONTNEED):
none reads what the previous one left in memory. Guards keep the machine alive: a tree holding
more anonymous memory than --max-rss-gib is killed (and its processes are the kernel's first
choice if memory runs out between polls: oom_score_adj 1000), as is one that leaves less than
--min-free-gib on the disk or runs longer than --timeout-min; the row then says so, with the peak
reached. Outputs are deleted after each conversion (GGUF outputs are first summarised: tensor
types and a digest of each tensor's bytes, so PocketLM's tensors are compared with llama.cpp's).

Writes benchmarks/results/scale.json (merged with the shapes and conversions of earlier runs)
and its section of benchmarks/README.md.

    .venv/bin/python benchmarks/scale_bench.py                      # bloomz-7b1 and T0pp (about an hour)
    .venv/bin/python benchmarks/scale_bench.py --shape bloomz-560m flan-t5-small   # minutes
    .venv/bin/python benchmarks/scale_bench.py --shape bloomz-7b1 --only pocketlm-q4_k_m llama.cpp-q4_k_m
    .venv/bin/python benchmarks/scale_bench.py --generate --shape bloomz-7b1      # only the checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import harness
import llama_tools
from common import CACHE, CONFIGS, RESULTS, machine, t5_shapes, t5_tokenizer_json
from harness import THREADS, child_env, error_line

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## Conversion at scale (issue 29)"
RESULT = "scale"
GIB, MIB = 2**30, 2**20
SHARD_BYTES = 5 * 10**9  # transformers 4's save_pretrained default max_shard_size
SEED = 0
POLL_S = 0.5
CHUNK = 2**25  # values generated at a time (128 MiB of float32)

# bigscience/bloomz-7b1's published config.json (../shared/model_configs has no copy of it).
BLOOMZ_7B1 = {
    "apply_residual_connection_post_layernorm": False,
    "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "masked_softmax_fusion": True,
    "model_type": "bloom",
    "n_head": 32,
    "n_inner": None,
    "n_layer": 30,
    "offset_alibi": 100,
    "pad_token_id": 3,
    "pretraining_tp": 1,
    "skip_bias_add": True,
    "skip_bias_add_qkv": False,
    "slow_but_exact": False,
    "torch_dtype": "float16",
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 250880,
}
SHAPES = {"bloomz-7b1": "bloom", "T0pp": "t5", "bloomz-560m": "bloom", "flan-t5-small": "t5"}
DEFAULT_SHAPES = ("bloomz-7b1", "T0pp")


@dataclass(frozen=True)
class Conversion:
    name: str
    tool: str  # pocketlm | llama.cpp | llama.cpp-direct | ctranslate2
    quant: str
    family: str  # bloom | t5
    default: bool = True

    @property
    def gguf(self) -> bool:
        return self.family == "bloom"


CONVERSIONS = {
    c.name: c
    for c in (
        Conversion("pocketlm-q4_k_m", "pocketlm", "q4_k_m", "bloom"),
        Conversion("pocketlm-q8_0", "pocketlm", "q8_0", "bloom"),
        Conversion("llama.cpp-q4_k_m", "llama.cpp", "q4_k_m", "bloom"),
        Conversion("llama.cpp-q8_0", "llama.cpp", "q8_0", "bloom"),
        Conversion("llama.cpp-q8_0-direct", "llama.cpp-direct", "q8_0", "bloom", default=False),
        Conversion("pocketlm-int8", "pocketlm", "int8", "t5"),
        Conversion("ctranslate2-int8", "ctranslate2", "int8", "t5"),
    )
}
# Bits per parameter of an output, for the disk estimate made before a shape starts (bloom's
# q4_k_m keeps its big embedding at q6_k; int8: a float scale per row besides).
BITS = {"q4_k_m": 5.6, "q8_0": 8.5, "int8": 8.2, "bf16": 16.0}

# llama.cpp's converter names a BPE tokenizer by a hash of how it splits a probe text and refuses
# unknown ones; the stand-in tokenizer (BLOOM's pre-tokenizer, 1024 merges) is unknown, so the
# refusal falls back to "bloom", the name the real bloomz tokenizer hashes to. Nothing else changes.
LLAMA_CONVERT = """\
import runpy, sys
tree = sys.argv.pop(1)
sys.path[0:0] = [tree, tree + "/gguf-py"]
import conversion.base as base
checked = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return checked(self, tokenizer)
    except NotImplementedError:
        return "bloom"
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Refused(Exception):
    """A run that cannot start (one line for the user)."""


# -- checkpoints ----------------------------------------------------------------------------


def shape_config(shape: str) -> dict[str, Any]:
    path = CONFIGS / f"{shape}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if shape == "bloomz-7b1":
        return dict(BLOOMZ_7B1)
    raise Refused(f"no config for {shape} in {CONFIGS}")


def tensor_specs(shape: str) -> dict[str, tuple[tuple[int, ...], float, float]]:
    """name -> (shape, mean, std) of every tensor of a checkpoint of `shape`, in file order."""
    cfg = shape_config(shape)
    if SHAPES[shape] == "t5":
        d, d_kv = cfg["d_model"], cfg["d_kv"]

        def t5_spec(name: str, dims: tuple[int, ...]) -> tuple[tuple[int, ...], float, float]:
            # as transformers initialises T5: unscaled attention, so small queries
            if name.endswith("layer_norm.weight"):
                return dims, 1.0, 0.0
            if name in ("shared.weight", "lm_head.weight"):
                return dims, 0.0, 1.0
            return dims, 0.0, (d * d_kv) ** -0.5 if name.endswith(".q.weight") else dims[-1] ** -0.5

        return {name: t5_spec(name, dims) for name, dims in t5_shapes(cfg).items()}
    h, v, std = cfg["hidden_size"], cfg["vocab_size"], 0.02  # as pocketlm.converters.synthetic's BLOOM
    specs: dict[str, tuple[tuple[int, ...], float, float]] = {"word_embeddings.weight": ((v, h), 0.0, std)}

    def norm(prefix: str) -> None:
        specs[prefix + ".weight"], specs[prefix + ".bias"] = ((h,), 1.0, std), ((h,), 0.0, std)

    norm("word_embeddings_layernorm")
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        norm(p + "input_layernorm")
        for sub, rows, cols in (
            ("self_attention.query_key_value", 3 * h, h),
            ("self_attention.dense", h, h),
            ("mlp.dense_h_to_4h", 4 * h, h),
            ("mlp.dense_4h_to_h", h, 4 * h),
        ):
            specs[f"{p}{sub}.weight"], specs[f"{p}{sub}.bias"] = ((rows, cols), 0.0, std), ((rows,), 0.0, std)
        norm(p + "post_attention_layernorm")
    norm("ln_f")
    return specs


def parameter_count(shape: str) -> int:
    return sum(math.prod(dims) for dims, _, _ in tensor_specs(shape).values())


def checkpoint_dir(shape: str) -> Path:
    return CACHE / f"{shape}-shape-bf16"


def checkpoint_info(shape: str) -> dict[str, Any] | None:
    """What the generation recorded, if the cached checkpoint is complete (index written last,
    every shard of its recorded size)."""
    folder = checkpoint_dir(shape)
    info_path = folder.with_suffix(".json")
    if not (folder / "model.safetensors.index.json").is_file() or not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if any(not (folder / f).is_file() or (folder / f).stat().st_size != n for f, n in info["shards"].items()):
        return None
    return info


def plan_shards(specs: dict[str, tuple[tuple[int, ...], float, float]]) -> list[list[str]]:
    """Tensors grouped into shards of at most SHARD_BYTES (and at least 3 shards, so a small
    shape is sharded too); a tensor larger than that is a shard of its own."""
    sizes = {name: math.prod(dims) * 2 for name, (dims, _, _) in specs.items()}
    limit = min(SHARD_BYTES, math.ceil(sum(sizes.values()) / 3))
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def generate(shape: str) -> dict[str, Any]:
    """Write the checkpoint of `shape` (in a child process: see common.peak_rss), one chunk of
    one tensor in memory at a time. bf16 by truncating float32 (the values are random anyway)."""
    import numpy as np

    started = time.perf_counter()
    folder = checkpoint_dir(shape)
    shutil.rmtree(folder, ignore_errors=True)
    folder.with_suffix(".json").unlink(missing_ok=True)
    folder.mkdir(parents=True)
    cfg = shape_config(shape)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if SHAPES[shape] == "t5":
        t5_tokenizer_json(cfg["vocab_size"], folder / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "T5TokenizerFast", "extra_ids": 100}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    else:
        from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

        train_bloom_tokenizer(SAMPLE_TEXT, 1024).save(str(folder / "tokenizer.json"))
    specs = tensor_specs(shape)
    groups = plan_shards(specs)
    order = {name: i for i, name in enumerate(specs)}
    weight_map, shards, total = {}, {}, 0
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = math.prod(specs[name][0]) * 2
            header[name] = {"dtype": "BF16", "shape": list(specs[name][0]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        partial = folder / (file + ".partial")
        with open(partial, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                dims, mean, std = specs[name]
                rng = np.random.default_rng([SEED, order[name]])
                left = math.prod(dims)
                while left:
                    n = min(left, CHUNK)
                    if std:
                        x = rng.standard_normal(n, dtype=np.float32)
                        x *= np.float32(std)
                        x += np.float32(mean)
                    else:
                        x = np.full(n, mean, np.float32)
                    f.write(x.view(np.uint16)[1::2].tobytes())  # the high halves: bf16, little-endian
                    left -= n
        partial.rename(folder / file)
        shards[file] = (folder / file).stat().st_size
        total += offset
        print(f"  {shape}: shard {k}/{len(groups)} written ({time.perf_counter() - started:.0f} s)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    info = {
        "shape": shape,
        "parameters": sum(math.prod(d) for d, _, _ in specs.values()),
        "tensors": len(specs),
        "bytes": sum(shards.values()),
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    folder.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_checkpoint(shape: str) -> dict[str, Any]:
    info = checkpoint_info(shape)
    if info:
        return info
    print(f"generating the {shape} checkpoint ({estimate_checkpoint(shape) / GIB:.1f} GiB of bf16)", flush=True)
    return harness.run_child(Path(__file__), {"kind": "generate", "shape": shape}, timeout_s=3 * 3600).result


def estimate_checkpoint(shape: str) -> int:
    return parameter_count(shape) * 2


# -- the conversions ------------------------------------------------------------------------


def llama_converter_tree() -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py for the installed llama-cpp-python:
    llama_tools' build source, else the one tests/test_t5_gguf_foreign.py unpacks."""
    version = installed_version("llama-cpp-python")
    for tree in (llama_tools.source_tree(version), llama_tools.CACHE / "llama-cpp-converter" / version):
        if tree and (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py").is_dir():
            return tree
    raise Refused(
        "no llama.cpp source tree with convert_hf_to_gguf.py: run `.venv/bin/python benchmarks/llama_tools.py` "
        "(or pytest tests/test_t5_gguf_foreign.py) once"
    )


def steps(conv: Conversion, src: Path, out: Path) -> tuple[list[tuple[str, list[str]]], Path]:
    """The commands of a conversion, in order, and the output they leave."""
    if conv.tool == "pocketlm":
        pocketlm = Path(sys.executable).with_name("pocketlm")
        if not pocketlm.is_file():
            raise Refused(f"no {pocketlm}: install the project into {Path(sys.executable).parent.parent}")
        fmt = "gguf" if conv.gguf else "ct2"
        final = out / ("model.gguf" if conv.gguf else "model-ct2")
        cmd = [str(pocketlm), "convert", str(src), "-o", str(final), "--format", fmt, "--quant", conv.quant]
        return [("convert", cmd + ["--force", "--json", "--threads", str(THREADS)])], final
    if conv.tool == "ctranslate2":
        final = out / "model-ct2"
        cmd = [sys.executable, "-m", "ctranslate2.converters.transformers", "--model", str(src)]
        return [("convert", cmd + ["--output_dir", str(final), "--quantization", conv.quant, "--force"])], final
    tree = llama_converter_tree()
    convert = [sys.executable, "-c", LLAMA_CONVERT, str(tree), str(src), "--outfile"]
    final = out / "model.gguf"
    if conv.tool == "llama.cpp-direct":
        return [("convert", convert + [str(final), "--outtype", conv.quant])], final
    quantize = llama_tools.build(("llama-quantize",), quiet=True) / "llama-quantize"
    middle = out / "model-bf16.gguf"
    return [
        ("convert to bf16", convert + [str(middle), "--outtype", "bf16"]),
        ("quantize", [str(quantize), str(middle), str(final), conv.quant.upper(), str(THREADS)]),
    ], final


def estimate_peak_disk(conv: Conversion, params: int) -> int:
    """Bytes on disk a conversion should need at its peak (for the check before a shape)."""
    out = params * BITS[conv.quant] / 8
    if conv.tool == "llama.cpp":
        return int(params * 2 + out)
    return int(out * 1.25)


@dataclass
class Limits:
    max_rss: int
    min_free: int
    timeout_s: float


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (each measured child starts one)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def rss_of(pids: list[int]) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes summed over `pids`."""
    rss = anon = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


def disk_of(folder: Path, pids: list[int]) -> int:
    """Allocated bytes of the files under `folder`, plus deleted files on its filesystem that
    `pids` still hold open (a temporary file unlinked at once is invisible in the folder)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    device = folder.stat().st_dev
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)"):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_dev == device and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def measure(cmd: list[str], env: dict[str, str], work: Path, log: Path, limits: Limits) -> dict[str, Any]:
    """Run `cmd` in a session of its own; its wall time, CPU time, peak RSS (tree), peak bytes
    on disk under `work`, and why it stopped if it failed or a guard killed it."""
    fs_free_start = free_bytes(work)
    fs_free_min = fs_free_start
    peak_rss = peak_anon = peak_disk = 0
    killed = None
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        Path(f"/proc/{proc.pid}/oom_score_adj").write_text("1000")  # inherited by its children
    except OSError:
        pass
    exited = select.poll()  # wakes the loop as soon as the child exits
    pidfd = os.pidfd_open(proc.pid)
    exited.register(pidfd, select.POLLIN)
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            pids = session_pids(proc.pid)
            rss, anon = rss_of(pids)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            peak_disk = max(peak_disk, disk_of(work, pids))
            free = free_bytes(work)
            fs_free_min = min(fs_free_min, free)
            elapsed = time.perf_counter() - started
            if killed is None:
                if anon > limits.max_rss:
                    killed = (
                        f"killed by the memory guard at {anon / GIB:.1f} GiB of anonymous RSS after {elapsed:.0f} s"
                    )
                elif free < limits.min_free:
                    killed = f"killed: under {limits.min_free / GIB:.0f} GiB left on the disk after {elapsed:.0f} s"
                elif elapsed > limits.timeout_s:
                    killed = f"killed: still running after {limits.timeout_s / 60:.0f} min"
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
            exited.poll(1000 * (POLL_S if anon < 0.7 * limits.max_rss else POLL_S / 5))  # closer watch near the limit
    except BaseException:  # interrupted: the child's session is out of reach of the terminal's ^C
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        os.close(pidfd)
    seconds = time.perf_counter() - started
    proc.returncode = status
    peak_disk = max(peak_disk, disk_of(work, []))  # what it left, in case it grew after the last poll
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the session, if any
    except ProcessLookupError:
        pass
    result = {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss": max(peak_rss, usage.ru_maxrss * 1024),
        "peak_rss_anon": peak_anon,
        "peak_disk": peak_disk,
        "fs_free_drop": fs_free_start - fs_free_min,
    }
    if killed:
        result["error"] = killed
    elif status:
        code = os.waitstatus_to_exitcode(status)
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        reason = error_line(RuntimeError(tail[-1])) if tail else ""
        if code < 0:
            reason = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        result["error"] = f"exit {code}: {reason}" if code > 0 else reason
    return result


def evict_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_conversion(conv: Conversion, shape: str, src: Path, limits: Limits) -> dict[str, Any]:
    """Measure one conversion (its steps in turn) in an empty work folder, summarise its
    output, then delete it."""
    work = CACHE / "scale-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    (work / "tmp").mkdir()
    logs = CACHE / "scale-logs"
    logs.mkdir(exist_ok=True)
    evict_from_page_cache(src)  # every conversion reads the checkpoint from disk, none from the last one's cache
    env = {k: v for k, v in child_env().items() if k != "NO_LOCAL_GGUF"} | {"TMPDIR": str(work / "tmp")}
    row: dict[str, Any] = {"tool": conv.tool, "quant": conv.quant, "date": time.strftime("%Y-%m-%d %H:%M")}
    row["load_before"] = round(os.getloadavg()[0], 2)
    try:
        plan, final = steps(conv, src, work / "out")
        parts = []
        for label, cmd in plan:
            log = logs / f"{shape}.{conv.name}.{label.replace(' ', '-')}.log"
            print(f"  {conv.name}: {label}", flush=True)
            part = {"step": label, **measure(cmd, env, work, log, limits), "log": str(log.relative_to(RESULTS))}
            if label == "convert to bf16" and "error" not in part:
                part["output_bytes"] = harness.path_bytes(Path(cmd[cmd.index("--outfile") + 1]))
            parts.append(part)
            if "error" in part:
                break
        row["steps"] = parts
        row["seconds"] = round(sum(p["seconds"] for p in parts), 1)
        row["cpu_seconds"] = round(sum(p["cpu_seconds"] for p in parts), 1)
        for key in ("peak_rss", "peak_rss_anon", "peak_disk", "fs_free_drop"):
            row[key] = max(p[key] for p in parts)
        failed = next((p for p in parts if "error" in p), None)
        if failed:
            row["error"] = (f"{failed['step']}: " if len(parts) > 1 else "") + failed["error"]
        else:
            row["output_bytes"] = harness.path_bytes(final)
            if conv.gguf:
                try:
                    row["tensors"] = harness.run_child(Path(__file__), {"kind": "digest", "path": str(final)}).result
                except RuntimeError as e:
                    row["tensors_error"] = error_line(e)
            if conv.tool == "pocketlm":
                row["summary"] = last_json((RESULTS / parts[-1]["log"]).read_text())
    except (Refused, llama_tools.ToolsUnavailable, RuntimeError, OSError) as e:
        row["error"] = error_line(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row["load_after"] = round(os.getloadavg()[0], 2)
    return row


def last_json(text: str) -> Any:
    """The last JSON object printed in `text` (`pocketlm convert --json`'s summary), or None."""
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text, i)[0]
        except ValueError:
            continue
    return None


def digest(path: str) -> dict[str, Any]:
    """A GGUF file's tensor types and a short digest of each tensor's bytes (child process)."""
    from pocketlm.converters.core.gguf_file import read_header

    header = read_header(path)
    tensors, types = {}, {}
    with open(path, "rb") as f:
        for t in header.tensors:
            f.seek(t.offset)
            h, left = hashlib.sha256(), t.nbytes
            while left:
                block = f.read(min(left, 64 * MIB))
                h.update(block)
                left -= len(block)
            tensors[t.name] = f"{t.type.name}:{h.hexdigest()[:16]}"
            types[t.type.name] = types.get(t.type.name, 0) + 1
    return {"types": types, "digests": tensors}


JOBS = {"generate": lambda job: generate(job["shape"]), "digest": lambda job: digest(job["path"])}


# -- the run --------------------------------------------------------------------------------


def selected(shape: str, only: list[str] | None) -> list[Conversion]:
    family = SHAPES[shape]
    if only:
        return [CONVERSIONS[n] for n in only if CONVERSIONS[n].family == family]
    return [c for c in CONVERSIONS.values() if c.family == family and c.default]


def check_disk(shapes: list[str], only: list[str] | None, margin: int, make_room: bool, convert: bool) -> None:
    """Refuse before anything runs if the disk cannot hold, at some point of the run, the
    checkpoints generated so far and a conversion's peak (estimates) with `margin` to spare
    (with --make-room, the cached checkpoints of shapes not in the run go first)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    need = missing = peak = 0
    for s in shapes:  # in order: a shape's checkpoint stays while the next ones run
        missing += 0 if checkpoint_info(s) else estimate_checkpoint(s)
        conv = max((estimate_peak_disk(c, parameter_count(s)) for c in selected(s, only)), default=0) if convert else 0
        if missing + conv + margin > need:
            need, peak = missing + conv + margin, conv
    free = free_bytes(CACHE)
    if free >= need:
        return
    others = [s for s in SHAPES if s not in shapes and checkpoint_info(s)]
    if make_room:
        for s in others:
            size = checkpoint_info(s)["bytes"]
            print(f"removing the cached {s} checkpoint ({size / GIB:.1f} GiB) to make room", flush=True)
            shutil.rmtree(checkpoint_dir(s))
            checkpoint_dir(s).with_suffix(".json").unlink(missing_ok=True)
        free = free_bytes(CACHE)
        if free >= need:
            return
    hint = (
        f"; --make-room would remove the cached {', '.join(others)} checkpoint(s)" if others and not make_room else ""
    )
    raise Refused(
        f"needs about {need / GIB:.0f} GiB free on the disk of {CACHE} (checkpoints to generate up to then "
        f"{(need - peak - margin) / GIB:.1f} GiB, a conversion's peak {peak / GIB:.1f} GiB, "
        f"margin {margin / GIB:.0f} GiB); {free / GIB:.1f} GiB free{hint}"
    )


def load_previous() -> dict[str, Any]:
    path = RESULTS / f"{RESULT}.json"
    return json.loads(path.read_text()) if path.is_file() else {"shapes": {}}


def main(argv: list[str]) -> int:
    if harness.child_main(JOBS):
        return 0
    parser = argparse.ArgumentParser(
        description="Conversion at the scale of bloomz-7b1 and T0pp: PocketLM's converter beside llama.cpp's "
        "(convert_hf_to_gguf.py + llama-quantize) and CTranslate2's, each in fresh processes one after the other: "
        "wall time, peak RSS of the process tree, peak bytes on disk (output folder + TMPDIR). "
        "Writes benchmarks/results/scale.json and its section of benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="conversions:\n"
        + "\n".join(f"  {c.name:24}{c.family}{'' if c.default else ' (only when named)'}" for c in CONVERSIONS.values())
        + "\n\nThe full run (bloomz-7b1 and T0pp) takes about an hour once the checkpoints exist (generating them: "
        "about 15 min more) and needs about 60 GB free the first time: 36 GB of cached checkpoints plus the largest "
        "conversion's peak (llama.cpp's bf16 file and its q8_0: 22 GB). Run it on an idle machine.",
    )
    parser.add_argument(
        "--shape",
        nargs="+",
        choices=list(SHAPES),
        default=list(DEFAULT_SHAPES),
        metavar="SHAPE",
        help=f"checkpoint shapes: {', '.join(SHAPES)} (default: {' '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CONVERSIONS),
        metavar="CONVERSION",
        help="run only these conversions (listed below; each applies to its family's shapes)",
    )
    parser.add_argument("--generate", action="store_true", help="only generate (or check) the checkpoints, then stop")
    parser.add_argument(
        "--max-rss-gib",
        type=float,
        default=20.0,
        help="kill a conversion whose process tree holds more anonymous memory than this (its RSS less mapped "
        "file pages, which the kernel can drop; default 20)",
    )
    parser.add_argument(
        "--min-free-gib",
        type=float,
        default=5.0,
        help="kill a conversion that leaves less than this on the disk (default 5)",
    )
    parser.add_argument("--timeout-min", type=float, default=180.0, help="kill a conversion after this (default 180)")
    parser.add_argument(
        "--make-room",
        action="store_true",
        help="when the disk is short, first delete the cached checkpoints of shapes not in this run",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a measured child is killed too (see measure)
    limits = Limits(int(args.max_rss_gib * GIB), int(args.min_free_gib * GIB), args.timeout_min * 60)
    try:
        if args.only and not any(selected(s, args.only) for s in args.shape):
            raise Refused(f"none of {', '.join(args.only)} applies to {', '.join(args.shape)}")
        check_disk(args.shape, args.only, limits.min_free, args.make_room, convert=not args.generate)
    except Refused as e:
        print(f"scale_bench: {e}", file=sys.stderr)
        return 2
    result = load_previous()
    started = time.perf_counter()
    command = "python benchmarks/scale_bench.py " + " ".join(argv)
    for shape in args.shape:
        try:
            info = ensure_checkpoint(shape)
        except RuntimeError as e:
            print(f"scale_bench: generating {shape} failed: {error_line(e)}", file=sys.stderr)
            return 1
        print(
            f"{shape}: {info['parameters'] / 1e9:.2f} B parameters, {info['bytes'] / GIB:.2f} GiB in "
            f"{len(info['shards'])} shards ({checkpoint_dir(shape).relative_to(RESULTS.parent.parent)})",
            flush=True,
        )
        if args.generate:
            continue
        entry = result["shapes"].setdefault(shape, {"runs": {}})
        entry["checkpoint"] = info
        for conv in selected(shape, args.only):
            row = run_conversion(conv, shape, checkpoint_dir(shape), limits)
            row["command"] = command
            entry["runs"][conv.name] = row
            print(f"  {conv.name}: {describe(row, info['bytes'])}", flush=True)
            result["machine"] = {**machine(), **harness.machine_details()}
            harness.write_result(RESULT, {k: v for k, v in result.items() if k not in ("benchmark", "date")})
            write_section(section(load_previous()))
    if not args.generate:
        print(f"done in {(time.perf_counter() - started) / 60:.0f} min")
    return 0


# -- the README section ---------------------------------------------------------------------


def size(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:,.0f} MiB"


def describe(row: dict[str, Any], checkpoint: int) -> str:
    figures = (
        f"{row.get('seconds', 0):.0f} s, peak RSS {size(row.get('peak_rss'))}, peak disk {size(row.get('peak_disk'))}"
    )
    return f"{row['error']} ({figures})" if "error" in row else f"{figures}, output {size(row['output_bytes'])}"


def tensor_note(row: dict[str, Any], runs: dict[str, Any]) -> str:
    """A GGUF's tensors (PocketLM's, llama.cpp's one-step q8_0) against llama.cpp's two-step file of the same type."""
    ref = runs.get(f"llama.cpp-{row['quant']}")
    if row["tool"] == "llama.cpp" or "tensors" not in row or not ref or "tensors" not in ref:
        return ""
    mine, theirs = row["tensors"]["digests"], ref["tensors"]["digests"]
    same = sum(mine.get(name) == d for name, d in theirs.items())
    extra = len(set(mine) - set(theirs))
    note = f"tensors identical to llama.cpp-{row['quant']}'s: {same}/{len(theirs)}"
    if same < len(theirs):
        differ = sorted(
            {
                theirs[n].split(":")[0] + "→" + mine.get(n, "absent:").split(":")[0]
                for n in theirs
                if mine.get(n) != theirs[n]
            }
        )
        note += f" (types llama.cpp→PocketLM where they differ: {', '.join(differ[:4])})"
    return note + (f"; {extra} more in PocketLM's" if extra else "")


def section(result: dict[str, Any]) -> list[str]:
    """The README section of results/scale.json (kept by write_section)."""
    out = [
        SECTION,
        "",
        "From `benchmarks/results/scale.json` (`benchmarks/scale_bench.py`; each row's command and date in the JSON). "
        "Random checkpoints of the published configs, generated shard by shard in bf16 safetensors with an index "
        "(their values are noise: the shapes, and so the work, are real; stand-in tokenizers). Each conversion in "
        "fresh child processes, one after the other; `time`: wall clock (CPU seconds of the tree besides); "
        "`peak RSS`: the process tree's, polled every 0.5 s, and of it the anonymous memory (the rest is mapped "
        "checkpoint pages, which the kernel may drop); `peak disk`: allocated bytes of the output folder and a "
        "dedicated TMPDIR (deleted files still open included), polled likewise, for llama.cpp's two steps with "
        "their bf16 intermediate file. llama.cpp's converter (convert_hf_to_gguf.py of the llama-cpp-python "
        "version installed) runs with one change: it names the stand-in tokenizer `bloom` instead of refusing "
        "its unknown hash. CTranslate2's converter is run as documented; the guards (memory, disk, time) stop a "
        "conversion and its row says where.",
        "",
    ]
    header = ["shape", "checkpoint", "converter", "time", "CPU s", "peak RSS (anon)", "RSS / checkpoint"]
    header += ["peak disk", "output", "disk / output", "notes"]
    body = []
    for shape, entry in result.get("shapes", {}).items():
        info = entry["checkpoint"]
        ckpt = f"{info['parameters'] / 1e9:.2f} B, {size(info['bytes'])}, {len(info['shards'])} shards"
        for name, row in entry["runs"].items():
            notes = []
            if len(row.get("steps", [])) > 1:
                notes.append(
                    " + ".join(
                        f"{p['step']} {p['seconds']:.0f} s"
                        + (f" ({size(p['output_bytes'])})" if "output_bytes" in p else "")
                        for p in row["steps"]
                    )
                )
            if row.get("error"):
                notes.append(f"**failed**: {row['error']}")
            if note := tensor_note(row, entry["runs"]):
                notes.append(note)
            out_bytes = row.get("output_bytes")
            body.append(
                [
                    shape,
                    ckpt,
                    name,
                    f"{row['seconds']:.0f} s" if "seconds" in row else "–",
                    f"{row['cpu_seconds']:.0f}" if "cpu_seconds" in row else "–",
                    f"{size(row.get('peak_rss'))} ({size(row.get('peak_rss_anon'))})" if "peak_rss" in row else "–",
                    f"{row['peak_rss'] / info['bytes']:.2f}x" if "peak_rss" in row else "–",
                    size(row.get("peak_disk")),
                    size(out_bytes),
                    f"{row['peak_disk'] / out_bytes:.2f}x" if out_bytes else "–",
                    "; ".join(notes),
                ]
            )
            ckpt = ""
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    out.append("")
    shapes = result.get("shapes", {})
    missing = [shape for shape in DEFAULT_SHAPES if shape not in shapes]
    if missing:
        out += [
            f"**{' and '.join(missing)}: not measured yet.** The full run, "
            "`.venv/bin/python benchmarks/scale_bench.py` on an idle machine, takes about an hour once the "
            "checkpoints exist (generating them: about 8 min) and needs, at its peak, disk for both checkpoints "
            "(13 + 21 GiB, kept in the cache), a conversion's output (up to 13 GiB) and a 5 GiB margin: about "
            "52 GiB. The rows above are the quick shapes "
            "(`--shape bloomz-560m flan-t5-small`, 3 min).",
            "",
        ]
    gens = [f"{s} {duration(e['checkpoint']['seconds'])}" for s, e in shapes.items()]
    dates = sorted(row["date"] for e in shapes.values() for row in e["runs"].values())
    if dates:
        out += [
            f"Measured {dates[0]}{f' to {dates[-1]}' if dates[-1] != dates[0] else ''} on {machine_line(result)}. "
            f"Generating the checkpoints took: {', '.join(gens)}.",
            "",
        ]
    return out


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def machine_line(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    return f"{m.get('cpu') or 'CPU ?'}, {m.get('usable_cpus', '?')} CPUs, {m.get('ram_gib', '?')} GiB RAM"


def write_section(lines: list[str]) -> None:
    """Put the section into benchmarks/README.md: in place of its previous version, else after
    the "## Conversion" section (else before "## Method"). report.py regenerates the rest."""
    text = README.read_text().splitlines() if README.is_file() else []
    if SECTION in text:
        start = text.index(SECTION)
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    else:
        after = text.index("## Conversion") if "## Conversion" in text else None
        anchor = (
            (lambda i, line: i > after and line.startswith("## "))
            if after is not None
            else (lambda i, line: line.startswith("## Method"))
        )
        start = end = next((i for i, line in enumerate(text) if anchor(i, line)), len(text))
    text[start:end] = lines
    README.write_text("\n".join(text).rstrip() + "\n")
    print(f"wrote {README} ({SECTION})", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
