"""Many callers at once: `pocketlm serve` under 1-16 concurrent clients, and batched scoring.

For each model (bloomz-560m q4_k_m, flan-t5-small and mt0-large as CTranslate2 int8, the
runtime's pick, and flan-t5-small as GGUF q8_0, the T5 GGUF path) the server runs in its own
process, once per `--parallel` setting (1 is the behaviour before continuous batching), and
for bloomz-560m two baselines run on the same GGUF: llama-cpp-python's own OpenAI server, and
llama.cpp's own `llama-server` (built once by benchmarks/llama_tools.py from the llama.cpp
source of the installed llama-cpp-python, about 10 minutes on 2 cores; reported as skipped
when it cannot be built) with `-np N` next to each `--parallel N` > 1, the same threads, the
same KV cache size (`-c`, PocketLM's default for N sequences), one unified KV cache, and the
same weight layout: `--no-repack` exactly where PocketLM turns llama.cpp's extra buffer types
off (CPUs that report AMX, whose repacked AMX weights crash under this project's hypervisor;
`pocketlm.converters.core.engine.extra_buffer_types`). The layout matters: on this project's Xeon the
repacked q4_K weights make a 512-token prefill 32% slower and a 16-sequence decode step 5%
faster, so a server with a different layout measures that, not the server. Each round sends N
completion requests at once (32 new tokens, greedy, each prompt a different window of
benchmarks/data/multilingual.txt: 110 characters for BLOOM, 32 tokens for the T5 family; the
same request to every server, whose `usage.completion_tokens` is counted: neither server is told
to ignore the end of sequence, and with these random weights every reply has its 32 tokens,
which the bench checks); aggregate new tokens/s is all completion tokens over the round's
wall time; latency is per request. Servers run one after the other, each through every client
count, medians of repeats, except `pocketlm --parallel N` and its `llama-server -np N` twin:
both are up at once and their rounds alternate (the same prompts to each), so the ratio between
them is measured under the same machine load. Also: `score()` over 8 candidates, one
by one (before) vs batched (prompt shared, candidates together), interleaved, median.

    .venv/bin/python benchmarks/serve_bench.py --quick          # minutes, noisy
    .venv/bin/python benchmarks/serve_bench.py                  # full
    .venv/bin/python benchmarks/serve_bench.py --quick --models bloomz-560m --only llama-server
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
import llama_tools
from common import HERE, ROOT

from pocketlm.converters.core.engine import extra_buffer_types

CLIENTS = (1, 4, 8, 16)
NEW_TOKENS = 32
PROMPT_TOKENS = 32
MODELS: dict[str, dict[str, Any]] = {
    "bloomz-560m": {
        "fmt": "gguf",
        "quant": "q4_k_m",
        "parallel": (1, 4, 8, 16),
        "llama_cpp_server": True,  # llama-cpp-python's server
        "llama_server": True,  # llama.cpp's llama-server -np N, for each --parallel N > 1
    },
    "flan-t5-small": {"fmt": "ct2", "quant": "int8", "parallel": (1, 8, 16)},
    "mt0-large": {"fmt": "ct2", "quant": "int8", "parallel": (1, 8, 16)},
    "flan-t5-small (GGUF)": {"model": "flan-t5-small", "fmt": "gguf", "quant": "q8_0", "parallel": (1, 8)},
}
TARGETS = {"bloomz-560m": 2.0, "flan-t5-small": 3.0, "mt0-large": 2.5}  # x --parallel 1 at 16 clients
LLAMA_SERVER = "llama-server"  # label prefix of llama.cpp's server variants


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

    def __init__(self, cmd: list[str], health: str, timeout: float = 900, env: dict[str, str] | None = None):
        self.port = free_port()
        cmd = [a.replace("{port}", str(self.port)) for a in cmd]
        # the server's log goes to a file: an unread pipe fills up and stalls a chatty server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**harness.child_env(), **(env or {})}, stdout=self.log, stderr=self.log, text=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                lines = [line for line in self.log.read().splitlines() if line.strip()]
                print("\n".join(f"    | {line}" for line in lines[-12:]), flush=True)  # the log's end
                last = lines[-1].strip() if lines else "no output"
                raise RuntimeError(f"server exited with {self.proc.returncode}: {last}")
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


def get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return json.loads(data)


def usual_kv_cells(parallel: int) -> int:
    """The KV cache (tokens, all sequences together) `pocketlm serve --parallel N` gives
    bloomz-560m here: N x its 2048-token context, at most 16384 (runtime/backends/
    llama_common.py). Only for a llama-server whose PocketLM twin did not run: otherwise its
    /health gives the figure."""
    return min(parallel * 2048, 16384)


def llama_server_variant(art: str, n: int) -> tuple[str, list[str], str]:
    """llama.cpp's llama-server with N slots ({llama_bin}: llama_tools' folder, set once built;
    {kv_cells}: the KV cache its PocketLM twin has)."""
    cmd = ["{llama_bin}/llama-server", "-m", art, "--host", "127.0.0.1", "--port", "{port}"]
    cmd += ["-t", str(harness.THREADS), "-np", str(n), "-c", "{kv_cells}"]
    cmd += ["--kv-unified", "--no-webui"] + ([] if extra_buffer_types() else ["--no-repack"])
    return f"{LLAMA_SERVER} -np {n}", cmd, "/health"


def variants(model: str, spec: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    """(label, command, health path) of each server; llama-server -np N follows --parallel N."""
    art = str(harness.artifact(spec.get("model", model), spec["fmt"], spec["quant"]))
    py = sys.executable
    pocketlm = [
        (
            f"pocketlm --parallel {n}",
            [
                py,
                "-m",
                "pocketlm",
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
    out = []
    for n, variant in zip(spec["parallel"], pocketlm):
        out.append(variant)
        if spec.get("llama_server") and n > 1:
            out.append(llama_server_variant(art, n))
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


def _groups(chosen: list[tuple[str, list[str], str]]) -> list[list[tuple[str, list[str], str]]]:
    """Servers measured together: `pocketlm --parallel N` and its `llama-server -np N` twin
    (up at once, rounds alternating between them), every other server alone."""
    out: list[list[tuple[str, list[str], str]]] = []
    for variant in chosen:
        twin = out and out[-1][0][0].startswith("pocketlm") and len(out[-1]) == 1
        if variant[0].startswith(LLAMA_SERVER) and twin and out[-1][0][0].split()[-1] == variant[0].split()[-1]:
            out[-1].append(variant)
        else:
            out.append([variant])
    return out


def _summary(label: str, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(x for run in runs for x in run["latencies"])
    short = [run["tokens"] for run in runs if run["tokens"] != n * NEW_TOKENS]
    if short:  # an end of sequence, or a server that did not honour max_tokens
        print(f"    warning: {label}: {short} new tokens in a round, not {n * NEW_TOKENS}", flush=True)
    row = {
        "tokens_per_s": statistics.median(run["tokens"] / run["wall"] for run in runs),
        "p50_s": latencies[len(latencies) // 2],
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "new_tokens": statistics.median(run["tokens"] for run in runs),
    }
    print(
        f"    {label}, {n:>2} clients: {row['tokens_per_s']:.1f} tok/s, p50 {row['p50_s']:.2f} s, "
        f"p95 {row['p95_s']:.2f} s",
        flush=True,
    )
    return row


def bench_model(
    model: str, spec: dict[str, Any], clients: tuple[int, ...], repeats: int, only: str | None = None
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    chosen = [v for v in variants(model, spec) if not only or only in v[0]]
    llama_bin: Path | None = None
    skipped = ""
    if any(label.startswith(LLAMA_SERVER) for label, _, _ in chosen):
        try:  # before any server runs: a first build takes minutes (and both cores)
            llama_bin = llama_tools.build(("llama-server",))
        except llama_tools.ToolsUnavailable as e:
            skipped = str(e).strip().replace("\n", " ")[:300]
    kv: dict[str, int] = {}  # --parallel N -> the KV cells PocketLM's /health reported
    for group in _groups(chosen):
        servers: dict[str, Server] = {}
        results: dict[str, dict[str, Any]] = {}
        try:
            for label, cmd, health in group:  # a PocketLM server first: its twin takes its KV size
                env = None
                n_seq = label.rsplit(" ", 1)[-1]
                if label.startswith(LLAMA_SERVER):
                    if llama_bin is None:
                        print(f"  {model}: {label}: skipped ({skipped})", flush=True)
                        rows[label] = {"skipped": skipped}
                        continue
                    cells = str(kv.get(n_seq) or usual_kv_cells(int(n_seq)))
                    cmd = [a.replace("{llama_bin}", str(llama_bin)).replace("{kv_cells}", cells) for a in cmd]
                    path = os.pathsep.join(filter(None, [str(llama_bin), os.environ.get("LD_LIBRARY_PATH")]))
                    env = {"LD_LIBRARY_PATH": path}
                print(f"  {model}: {label}", flush=True)
                try:
                    server = Server(cmd, health, env=env)
                except RuntimeError as e:
                    rows[label] = {"error": str(e)[:300]}
                    continue
                servers[label] = server
                results[label] = {}
                if label.startswith("pocketlm"):
                    results[label]["kv_cells"] = kv[n_seq] = get_json(server.port, "/health").get("kv_cells")
                elif label.startswith(LLAMA_SERVER):
                    results[label]["kv_cells"] = int(cmd[cmd.index("-c") + 1])
                round_of(server.port, prompts(spec.get("model", model), 1, 9999))  # warm-up
            labels = list(servers)
            for n in clients:
                runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
                for r in range(repeats):  # the same prompts to each server, in alternating order
                    for label in labels if r % 2 == 0 else labels[::-1]:
                        runs[label].append(
                            round_of(servers[label].port, prompts(spec.get("model", model), n, 100 * r + n))
                        )
                for label in labels:
                    results[label][str(n)] = _summary(label, n, runs[label])
            for label in labels:
                results[label]["peak_rss_mib"] = round(servers[label].peak_rss_mib(), 1)
                rows[label] = results[label]
        finally:
            for server in servers.values():
                server.close()
    return rows


def llama_server_info(models: dict[str, Any]) -> dict[str, Any] | None:
    """How the llama-server rows were run, when some were."""
    measured = [
        label
        for rows in models.values()
        for label, r in rows.items()
        if label.startswith(LLAMA_SERVER) and "error" not in r and "skipped" not in r
    ]
    if not measured:
        return None
    built = llama_tools.build_info(llama_tools.cache_dir() / "bin")
    _, cmd, _ = llama_server_variant("MODEL.gguf", 0)
    command = " ".join(cmd).replace("{llama_bin}/", "").replace("{port}", "PORT").replace("{kv_cells}", "CELLS")
    return {
        "llama_cpp_python": built.get("version"),
        "cmake_flags": built.get("cmake_flags"),
        "build_minutes": built.get("minutes"),
        "command": command.replace("-np 0", "-np N"),
    }


def score_child(args: dict[str, Any]) -> dict[str, Any]:
    """score() over 8 candidates: one by one as before vs batched, interleaved."""
    import numpy as np

    import pocketlm

    ids = harness.text_ids()
    context = harness.prompt(ids, 64, 1)
    candidates = [harness.prompt(ids, 1 + i % 4, 50 + i) for i in range(8)]
    with pocketlm.load(args["path"], threads=harness.THREADS, parallel=args["parallel"]) as model:

        def one_by_one() -> None:
            for cand in candidates:
                model.engine.continuation_logits(model.prompt_ids(context), cand).astype(np.float64)

        times: dict[str, list[float]] = {"one by one": [], "batched": []}
        model.score(context, candidates)  # warm
        for _ in range(args["repeats"]):
            for name, fn in (("one by one", one_by_one), ("batched", lambda: model.score(context, candidates))):
                for slot in range(len(model.engine._slots)):  # nothing cached from the last run
                    model.engine._forget(slot)
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
            if "error" not in r and "skipped" not in r:
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
    import pocketlm

    ids = harness.text_ids()
    out: dict[str, Any] = {}
    with pocketlm.load(args["path"], threads=harness.THREADS, parallel=16) as model:
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
        "llama_server": llama_server_info(models) or (previous or {}).get("llama_server"),
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
