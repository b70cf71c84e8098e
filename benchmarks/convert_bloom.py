"""Conversion time and peak memory on a bloomz-560m-shaped checkpoint.

Builds (once, cached) a random checkpoint with the real config from
../shared/model_configs/bloomz-560m.json, stored in f16 like the published one, then runs
`python -m convert` for several quant types, each in its own process, and records wall
time and the process's peak RSS (from wait4). Writes benchmarks/results/convert_bloom.json.

    .venv/bin/python benchmarks/convert_bloom.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent.parent / "shared" / "model_configs" / "bloomz-560m.json"
CACHE = HERE / "results" / "cache"
QUANTS = ("f16", "q8_0", "q4_k_m")


def build_checkpoint() -> Path:
    from convert.checkpoint import write_safetensors
    from convert.synthetic import SAMPLE_TEXT, random_bloom_weights, train_bloom_tokenizer

    folder = CACHE / "bloomz-560m-shape"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(CONFIG.read_text())
    train_bloom_tokenizer(SAMPLE_TEXT, 1024).save(str(folder / "tokenizer.json"))
    write_safetensors(folder / "model.safetensors.tmp", random_bloom_weights(config))
    (folder / "model.safetensors.tmp").rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def peak_rss(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of a command run as a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024, out


def main() -> int:
    if sys.argv[1:] == ["--build-only"]:
        build_checkpoint()
        return 0
    # Built in a child: a child's peak RSS counts memory inherited at fork, so the measuring
    # process itself must stay small.
    subprocess.run([sys.executable, __file__, "--build-only"], check=True)
    src = CACHE / "bloomz-560m-shape"
    ckpt_bytes = sum(p.stat().st_size for p in src.iterdir())
    rows = []
    for quant in QUANTS:
        out = CACHE / f"bloomz-560m-shape-{quant}.gguf"
        seconds, rss, stdout = peak_rss(
            [sys.executable, "-m", "convert", str(src), "-o", str(out), "--quant", quant, "--force", "--json"]
        )
        summary = json.loads(stdout)
        rows.append({
            "quant": quant, "seconds": round(seconds, 1), "peak_rss_mib": round(rss / 2**20),
            "peak_rss_vs_checkpoint": round(rss / ckpt_bytes, 2), "output_mib": round(summary["size_bytes"] / 2**20, 1),
        })
        out.unlink()
    result = {
        "benchmark": "convert_bloom", "command": "python benchmarks/convert_bloom.py",
        "machine": {"cpus": os.cpu_count(), "system": platform.platform()},
        "checkpoint": {"shape": "bloomz-560m (random weights, f16 safetensors)", "mib": round(ckpt_bytes / 2**20)},
        "results": rows,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "convert_bloom.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint {result['checkpoint']['mib']} MiB ({result['checkpoint']['shape']})")
    print("| quant | time (s) | peak RSS (MiB) | peak RSS / checkpoint | output (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['seconds']} | {r['peak_rss_mib']} | {r['peak_rss_vs_checkpoint']} | {r['output_mib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
