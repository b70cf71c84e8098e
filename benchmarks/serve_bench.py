"""Many callers at once: `pocketlm serve` under 1-16 concurrent clients, and batched scoring.

For each model (bloomz-560m q4_k_m, flan-t5-small and mt0-large as CTranslate2 int8, the
runtime's pick, and flan-t5-small as GGUF q8_0, the T5 GGUF path) the server runs in its own
process, once per `--parallel` setting (1 is the behaviour before continuous batching), and
for bloomz-560m llama-cpp-python's own OpenAI server runs on the same GGUF. Each round sends
N completion requests at once (32 new tokens, greedy, each prompt a different 32-token window
of benchmarks/data/multilingual.txt); aggregate new tokens/s is all completion tokens over the
round's wall time; latency is per request. Rounds alternate between settings (one server is
up at a time), medians of repeats. Also: `score()` over 8 candidates, one by one (before) vs
batched (prompt shared, candidates together), interleaved, median.

    .venv/bin/python benchmarks/serve_bench.py --quick          # minutes, noisy
    .venv/bin/python benchmarks/serve_bench.py                  # full
Writes benchmarks/results/serve.json (report.py adds it to benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from common import HERE, ROOT

CLIENTS = (1, 4, 8, 16)
NEW_TOKENS = 32
PROMPT_TOKENS = 32
MODELS: dict[str, dict[str, Any]] = {
    "bloomz-560m": {"fmt": "gguf", "quant": "q4_k_m", "parallel": (1, 4, 8, 16), "llama_cpp_server": True},
    "flan-t5-small": {"fmt": "ct2", "quant": "int8", "parallel": (1, 8, 16)},
    "mt0-large": {"fmt": "ct2", "quant": "int8", "parallel": (1, 8, 16)},
    "flan-t5-small (GGUF)": {"model": "flan-t5-small", "fmt": "gguf", "quant": "q8_0", "parallel": (1, 8)},
}
TARGETS = {"bloomz-560m": 2.0, "flan-t5-small": 3.0, "mt0-large": 2.5}  # x --parallel 1 at 16 clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict[str, Any], timeout: float = 900) -> tuple[float, int]:
    """(seconds, completion tokens) of one completion request."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    return time.perf_counter() - started, int(json.loads(data)["usage"]["completion_tokens"])


class Server:
    """A server process on a free port, up once it answers."""

    def __init__(self, cmd: list[str], health: str, timeout: float = 900):
        self.port = free_port()
        cmd = [a.replace("{port}", str(self.port)) for a in cmd]
        # the server's log goes to a file: an unread pipe fills up and stalls a chatty server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=harness.child_env(), stdout=self.log, stderr=self.log, text=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-400:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", health)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("server did not come up")

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(model: str, count: int, first: int) -> list[Any]:
    """Distinct prompts: text for BLOOM (both servers tokenize it), ids for the T5 family."""
    if harness.is_seq2seq(model):
        ids = harness.text_ids()
        return [harness.prompt(ids, PROMPT_TOKENS, first + i, eos=1) for i in range(count)]
    text = harness.TEXT.read_text(encoding="utf-8").replace("\n", " ")
    return [text[(first + i) * 173 % (len(text) - 200) :][:110] for i in range(count)]


def round_of(port: int, batch: list[Any]) -> dict[str, Any]:
    bodies = [{"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0} for p in batch]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: post(port, b), bodies))
    wall = time.perf_counter() - started
    return {"wall": wall, "latencies": [r[0] for r in replies], "tokens": sum(r[1] for r in replies)}


def variants(model: str, spec: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    art = str(harness.artifact(spec.get("model", model), spec["fmt"], spec["quant"]))
    py = sys.executable
    out = [
        (
            f"pocketlm --parallel {n}",
            [
                py,
                "-m",
                "runtime",
                "serve",
                art,
                "--port",
                "{port}",
                "--threads",
                str(harness.THREADS),
                "--parallel",
                str(n),
                "--max-queue",
                "64",
            ],
            "/health",
        )
        for n in spec["parallel"]
    ]
    if spec.get("llama_cpp_server"):
        out.append(
            (
                "llama-cpp-python server",
                [
                    py,
                    str(HERE / "llama_cpp_server.py"),
                    "--model",
                    art,
                    "--port",
                    "{port}",
                    "--n_threads",
                    str(harness.THREADS),
                    "--n_ctx",
                    "2048",
                ],
                "/v1/models",
            )
        )
    return out


def bench_model(
    model: str, spec: dict[str, Any], clients: tuple[int, ...], repeats: int, only: str | None = None
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for label, cmd, health in variants(model, spec):
        if only and only not in label:
            continue
        print(f"  {model}: {label}", flush=True)
        try:
            server = Server(cmd, health)
        except RuntimeError as e:
            rows[label] = {"error": str(e)[:300]}
            continue
        try:
            round_of(server.port, prompts(spec.get("model", model), 1, 9999))  # warm-up
            result: dict[str, Any] = {}
            for n in clients:
                runs = [
                    round_of(server.port, prompts(spec.get("model", model), n, 100 * r + n)) for r in range(repeats)
                ]
                latencies = sorted(x for run in runs for x in run["latencies"])
                result[str(n)] = {
                    "tokens_per_s": statistics.median(run["tokens"] / run["wall"] for run in runs),
                    "p50_s": latencies[len(latencies) // 2],
                    "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                    "new_tokens": statistics.median(run["tokens"] for run in runs),
                }
                print(
                    f"    {n:>2} clients: {result[str(n)]['tokens_per_s']:.1f} tok/s, "
                    f"p50 {result[str(n)]['p50_s']:.2f} s, p95 {result[str(n)]['p95_s']:.2f} s",
                    flush=True,
                )
            result["peak_rss_mib"] = round(server.peak_rss_mib(), 1)
            rows[label] = result
        finally:
            server.close()
    return rows


def score_child(args: dict[str, Any]) -> dict[str, Any]:
    """score() over 8 candidates: one by one as before vs batched, interleaved."""
    import numpy as np

    import runtime

    ids = harness.text_ids()
    context = harness.prompt(ids, 64, 1)
    candidates = [harness.prompt(ids, 1 + i % 4, 50 + i) for i in range(8)]
    with runtime.load(args["path"], threads=harness.THREADS, parallel=args["parallel"]) as model:

        def one_by_one() -> None:
            for cand in candidates:
                model._continuation_logits(model._prompt_ids(context), cand).astype(np.float64)

        times: dict[str, list[float]] = {"one by one": [], "batched": []}
        model.score(context, candidates)  # warm
        for _ in range(args["repeats"]):
            for name, fn in (("one by one", one_by_one), ("batched", lambda: model.score(context, candidates))):
                for slot in range(len(model._slots)):  # nothing cached from the last run
                    model._forget(slot)
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def plot(models: dict[str, Any], clients: tuple[int, ...]) -> str | None:
    """results/serve.png: aggregate tokens/s against concurrent clients, one panel per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, (model, variants) in zip(axes[0], models.items()):
        for label, r in variants.items():
            if "error" not in r:
                ax.plot(clients, [r[str(n)]["tokens_per_s"] for n in clients], marker="o", label=label)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("concurrent clients", fontsize=8)
        ax.set_ylabel("aggregate new tokens/s", fontsize=8)
        ax.set_xticks(clients)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "serve.png", dpi=120)
    return "serve.png"


def window_child(args: dict[str, Any]) -> dict[str, Any]:
    """CTranslate2's batch window: requests sent at once by N threads, for each window."""
    import runtime

    ids = harness.text_ids()
    out: dict[str, Any] = {}
    with runtime.load(args["path"], threads=harness.THREADS, parallel=16) as model:
        model.generate(harness.prompt(ids, PROMPT_TOKENS, 1, eos=1), max_new_tokens=4)
        for window in args["windows"]:
            model.scheduler.window = window
            row: dict[str, Any] = {}
            for n in args["clients"]:
                runs = []
                for r in range(args["repeats"]):
                    batch = [harness.prompt(ids, PROMPT_TOKENS, 500 + 37 * r + i, eos=1) for i in range(n)]
                    started = time.perf_counter()

                    def one(p: list[int]) -> tuple[float, int]:
                        t = time.perf_counter()
                        result = model.generate(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                        return time.perf_counter() - t, len(result.token_ids)

                    with concurrent.futures.ThreadPoolExecutor(n) as pool:
                        replies = list(pool.map(one, batch))
                    wall = time.perf_counter() - started
                    runs.append((sum(r[1] for r in replies) / wall, statistics.median(r[0] for r in replies)))
                row[str(n)] = {
                    "tokens_per_s": statistics.median(r[0] for r in runs),
                    "p50_s": statistics.median(r[1] for r in runs),
                }
            out[str(window)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer client counts (noisy)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the servers whose label contains TEXT")
    parser.add_argument("--keep-others", action="store_true", help="keep the last run's other results (and score)")
    args = parser.parse_args()
    clients, repeats = ((1, 16), 1) if args.quick else (CLIENTS, 3)
    started = time.time()
    models = {m: bench_model(m, MODELS[m], clients, repeats, args.only) for m in args.models}
    previous = harness.previous_result("serve", "quick" if args.quick else "full") if args.keep_others else None
    if previous:
        for model, rows in previous["models"].items():
            models[model] = {**rows, **models.get(model, {})}
        started -= previous["minutes"] * 60  # the report gives the time of every part kept
    scores = dict(previous["score"]) if previous and args.only else {}
    art = harness.artifact("bloomz-560m", "gguf", "q4_k_m")
    for parallel in () if previous and args.only else (1, 8):
        job = {"kind": "score", "path": str(art), "parallel": parallel, "repeats": 3 if args.quick else 7}
        try:
            scores[f"parallel {parallel}"] = harness.run_child(Path(__file__), job, timeout_s=1800).result
        except RuntimeError as e:
            scores[f"parallel {parallel}"] = {"error": harness.error_line(e)}
    window = {}
    if not (previous and args.only):
        job = {
            "kind": "window",
            "path": str(harness.artifact("flan-t5-small", "ct2", "int8")),
            "windows": [0.0, 0.005, 0.02, 0.05],
            "clients": [1, 4, 16],
            "repeats": 1 if args.quick else 3,
        }
        try:
            window = harness.run_child(Path(__file__), job, timeout_s=1800).result
        except RuntimeError as e:
            window = {"error": harness.error_line(e)}
    elif previous:
        window = previous.get("window", {})
    payload = {
        "mode": "quick" if args.quick else "full",
        "clients": list(clients),
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": PROMPT_TOKENS,
        "repeats": repeats,
        "threads": harness.THREADS,
        "models": models,
        "score": scores,
        "window": window,
        "targets": TARGETS,
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python benchmarks/serve_bench.py" + (" --quick" if args.quick else ""),
    }
    payload["plot"] = plot(models, clients)
    path = harness.write_result("serve", payload)
    print(f"wrote {path}", flush=True)
    if not args.no_report:
        subprocess.run([sys.executable, str(HERE / "report.py")], check=False)


if __name__ == "__main__":
    if harness.child_main({"score": score_child, "window": window_child}):
        sys.exit(0)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
