"""Scale out on Ray: the same JSONL job in one process vs on 1 and 2 local Ray actors.

bloomz-560m q4_k_m (random weights, real shape), N prompts of 16-48 tokens from
benchmarks/data/multilingual.txt, 16 new tokens each, greedy, batch size 16. Three settings
share the machine's CPUs: one process (`pocketlm run --input`, all threads), one Ray actor
(all threads), two Ray actors (half the threads each). Each round runs the whole job,
end to end (actor start and model load included: what a user waits for), settings in turn,
medians of rounds. One local Ray instance serves every round. On a 2-core machine two actors
cannot be faster than one: the figure shows Ray's overhead, not a speed-up.

    .venv/bin/python benchmarks/ray_bench.py --quick      # 64 prompts, 2 rounds
    .venv/bin/python benchmarks/ray_bench.py              # 256 prompts, 3 rounds
Writes benchmarks/results/ray.json (report.py adds it to benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness
from common import ROOT

sys.path.insert(0, str(ROOT))

import pocketlm  # noqa: E402
from pocketlm.cli import batch  # noqa: E402
from pocketlm.serving import ray_cluster as on_ray  # noqa: E402

MODEL, QUANT = "bloomz-560m", "q4_k_m"
NEW_TOKENS, PROMPT_TOKENS, BATCH = 16, 32, 16


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 prompts, 2 rounds")
    args = parser.parse_args(argv)
    count, rounds = (64, 2) if args.quick else (256, 3)
    started = time.time()
    gguf = harness.artifact(MODEL, "gguf", QUANT)
    cores = os.cpu_count() or 1
    ids = harness.text_ids()
    prompts = harness.batch_prompts(ids, count, PROMPT_TOKENS, 0, None)
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    source = work / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    on_ray.connect()

    def one_process(out: Path) -> None:
        with pocketlm.load(gguf, threads=cores, parallel=BATCH, progress=False) as model:
            batch.run_jsonl(model, source, out, BATCH, options=model.options(**options))

    def ray_actors(actors: int):
        def job(out: Path) -> None:
            threads = max(1, cores // actors)
            on_ray.run_jsonl_on_ray(str(gguf), source, out, None, actors, BATCH, options, {"threads": threads})

        return job

    settings = {"one process": one_process, "1 Ray actor": ray_actors(1), "2 Ray actors": ray_actors(2)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    answers: dict[str, dict] = {}
    for r in range(rounds):
        for name, job in settings.items():
            out = work / f"{name.replace(' ', '_')}-{r}.jsonl"
            t = time.perf_counter()
            job(out)
            seconds[name].append(time.perf_counter() - t)
            records = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(records) == count, (name, len(records))
            answers[name] = {r["id"]: r["token_ids"] for r in records}
            print(f"round {r + 1}/{rounds} {name}: {seconds[name][-1]:.1f} s", flush=True)
    base = harness.median(seconds["one process"])
    results = {}
    for name, values in seconds.items():
        med = harness.median(values)
        results[name] = {
            "seconds": [round(v, 2) for v in values],
            "median_s": round(med, 2),
            "tokens_per_s": round(count * NEW_TOKENS / med, 1),
            "vs_one_process": round(base / med, 3),
            "same_tokens_as_one_process": sum(answers[name][i] == answers["one process"][i] for i in range(count)),
        }
    payload = {
        "mode": "quick" if args.quick else "full",
        "command": "benchmarks/ray_bench.py" + (" --quick" if args.quick else ""),
        "minutes": round((time.time() - started) / 60, 1),
        "model": f"{MODEL} {QUANT}",
        "prompts": count,
        "new_tokens": NEW_TOKENS,
        "batch_size": BATCH,
        "rounds": rounds,
        "cores": cores,
        "settings": results,
        **harness.machine_details(),
    }
    print(json.dumps(results, indent=2))
    print(harness.write_result("ray", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
