"""Speed and memory of PocketLM next to transformers (fp32, CPU), on real-shape random models.

For each model (bloomz-560m, flan-t5-small, mt0-large; see common.py) and each variant (the
transformers baseline; every GGUF quant type for BLOOM; CTranslate2 int8 under each CPU
compute type, and the runtime's own pick, for the T5 family; T5-family GGUF when the
converter and runtime handle it), each in its own fresh processes: load time, peak RSS, time
to first token, prompt and decode tokens/s at batch 1 (fixed lengths, end of sequence
ignored), and for the T5 family the throughput of one batch of 16 prompts. Also: PocketLM's
overhead over calling llama.cpp / CTranslate2 directly, the machine's memory bandwidth and
each variant's decode speed as a fraction of it (roofline), and `import pocketlm` time.
Writes benchmarks/results/speed.json, then regenerates benchmarks/README.md (report.py).

    .venv/bin/python benchmarks/speed_bench.py --quick            # minutes, noisy
    .venv/bin/python benchmarks/speed_bench.py                    # full: 3 processes x 2 runs
    .venv/bin/python benchmarks/speed_bench.py --models flan-t5-small --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import harness
from harness import (
    REAL_SHAPES,
    THREADS,
    ArtifactError,
    ChildResult,
    Settings,
    Variant,
    artifact,
    child_main,
    error_line,
    is_seq2seq,
    median,
    path_bytes,
    ratio,
    run_child,
    source_folder,
    spread,
)

SCRIPT = Path(__file__).resolve()
BLOOM_GGUF = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")
T5_GGUF = ("f16", "q8_0", "q4_k_m")
CT2_COMPUTE = ("int8", "int8_float32", "float32")
CT2_FILE = "int8"  # the converter's default for the T5 family: what users run
TARGETS = {"bloom_decode": 8.0, "bloom_rss": 0.3, "overhead": 0.03, "t5_decode": 3.5, "import_s": 0.3}


def variants(model: str) -> list[Variant]:
    """Everything measured for one model, the baselines first.

    transformers runs twice: with OpenMP's default waiting and with OMP_WAIT_POLICY=PASSIVE.
    Spinning worker threads make torch many times slower whenever the cores are shared
    (measured: 5 vs 28 tok/s for flan-t5-small on a busy 2-core machine); ratios use the
    better of the two, so a busy machine cannot flatter PocketLM."""
    out = [Variant(model, "transformers"), Variant(model, "transformers", omp_wait_policy="PASSIVE")]
    if not is_seq2seq(model):
        return out + [Variant(model, "pocketlm", "gguf", q) for q in BLOOM_GGUF]
    out.append(Variant(model, "pocketlm", "hf", "auto"))  # pocketlm.load(checkpoint folder): its own pick
    out += [Variant(model, "pocketlm", "ct2", CT2_FILE, c) for c in CT2_COMPUTE]
    return out + [Variant(model, "pocketlm", "gguf", q) for q in T5_GGUF]


# -- child jobs -----------------------------------------------------------------------------


def job_prepare(job: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint folder once, so that PocketLM converts it into its cache now rather
    than in the first measured process."""
    import engines

    runner = engines.PocketLMRunner(Path(job["path"]))
    return {"path": runner.model.info.path, "file_bytes": harness.path_bytes(Path(runner.model.info.path))}


def job_generate(job: dict[str, Any]) -> dict[str, Any]:
    """Load one variant, warm up, then time `runs` generations (batch 1, or one batch)."""
    import engines
    from harness import batch_prompts, prompt, text_ids

    v, s = Variant.from_dict(job["variant"]), Settings(**job["settings"])
    seq2seq, source = is_seq2seq(v.model), Path(job["source"])
    cfg = harness.model_config(v.model)
    eos = int(cfg["eos_token_id"]) if seq2seq else None
    ids = text_ids()
    started = time.perf_counter()
    if v.engine == "transformers":
        runner: Any = engines.TransformersRunner(source, seq2seq, int(cfg.get("pad_token_id", 0)))
    else:
        runner = engines.PocketLMRunner(Path(job["path"]), v.compute_type)
    out: dict[str, Any] = {"load_s": time.perf_counter() - started}
    if v.engine == "pocketlm":
        info = runner.model.info.to_dict()
        out["info"] = {
            k: info[k] for k in ("path", "format", "backend", "device", "quant", "threads", "n_ctx", "reasons")
        }
        out["compute_type"] = engines.compute_type_of(runner.model) if info["format"] == "ct2" else None
    if job["batch"]:
        first = 1 + job["process"] * (s.batch_runs + 1)  # distinct prompts: no engine reuses a cached prefix
        prompts = lambda r: batch_prompts(ids, s.batch_prompts, s.prompt_tokens, 1000 + r * s.batch_prompts, eos)
        runner.generate_batch(prompts(first - 1), s.warmup_new_tokens)
        out["runs"] = [
            dict(zip(("seconds", "new_tokens"), runner.generate_batch(prompts(first + r), s.batch_new_tokens)))
            for r in range(s.batch_runs)
        ]
        out["prompt_tokens"] = sum(len(p) for p in prompts(first))
        return out
    first = 1 + job["process"] * (s.runs + 1)
    out["warmup"] = runner.generate(prompt(ids, s.prompt_tokens, first - 1, eos), s.warmup_new_tokens).to_dict()
    out["runs"] = [
        runner.generate(prompt(ids, s.prompt_tokens, first + r, eos), s.new_tokens).to_dict() for r in range(s.runs)
    ]
    if v.engine == "transformers":
        out["bytes_per_token"] = decode_bytes(v.model, "hf", "fp32", None, source, source, cfg, s)
    else:
        i = out["info"]
        out["bytes_per_token"] = decode_bytes(
            v.model, i["format"], i["quant"], out["compute_type"], source, Path(i["path"]), cfg, s
        )
    return out


def decode_bytes(
    model: str, fmt: str, quant: str, compute: str | None, source: Path, path: Path, cfg: dict[str, Any], s: Settings
) -> dict[str, int]:
    """Weight and cache bytes one decode step reads at the run's average position, for what
    actually ran: `fmt` hf (transformers), gguf or ct2 (formulas in engines.py)."""
    import engines

    seq2seq = is_seq2seq(model)
    position = (1 if seq2seq else s.prompt_tokens) + s.new_tokens / 2
    source_len = s.prompt_tokens if seq2seq else 0
    cross_cached = True
    if fmt == "gguf":
        weights, element = engines.gguf_decode_weight_bytes(path), 4 if quant == "f32" else 2
        cross_cached = False  # llama.cpp's t5 recomputes cross-attention k/v every step
    elif fmt == "ct2" and compute and compute.startswith("int8"):
        weights, element = engines.hf_decode_weight_bytes(source, True, 1, row_scale_bytes=4), 4
    else:  # transformers fp32, or CTranslate2 computing in float32 (weights expanded at load)
        weights, element = engines.hf_decode_weight_bytes(source, seq2seq, 4), 4
    cache = engines.cache_bytes(cfg, seq2seq, position, source_len, element, cross_cached)
    return {"weights": weights, "cache": cache, "total": weights + cache}


def job_overhead_llama(job: dict[str, Any]) -> dict[str, Any]:
    """PocketLM's generate vs raw llama.cpp and llama-cpp-python's Llama, interleaved."""
    import engines
    from harness import prompt, text_ids

    s, path, ids = Settings(**job["settings"]), Path(job["path"]), text_ids()
    ours = engines.PocketLMRunner(path)
    n_ctx = ours.model.info.n_ctx
    runners = {
        "pocketlm": ours.generate,
        "raw C API loop": engines.RawLlama(path, n_ctx).generate,
        "llama_cpp.Llama": engines.HighLevelLlama(path, n_ctx).generate,
    }
    return _interleave(runners, lambda r: prompt(ids, s.prompt_tokens, r, None), s)


def job_overhead_ct2(job: dict[str, Any]) -> dict[str, Any]:
    """PocketLM's generate / batch generate vs ctranslate2.Translator, same compute type."""
    import engines
    from harness import batch_prompts, prompt, text_ids

    s, path, ids = Settings(**job["settings"]), Path(job["path"]), text_ids()
    eos = int(harness.model_config(job["model"])["eos_token_id"])
    ours = engines.PocketLMRunner(path)
    compute = engines.compute_type_of(ours.model) or "default"
    direct = engines.DirectCT2(path, compute)
    single = _interleave(
        {"pocketlm": ours.generate, "Translator.generate_tokens": direct.generate},
        lambda r: prompt(ids, s.prompt_tokens, r, eos),
        s,
    )
    prompts = batch_prompts(ids, s.batch_prompts, s.prompt_tokens, 1000, eos)
    calls = {"pocketlm": ours.generate_batch, "Translator.translate_batch": direct.generate_batch}
    batched: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(prompts, s.warmup_new_tokens)
    for r in range(s.overhead_runs):
        for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
            batched[name].append(calls[name](prompts, s.batch_new_tokens)[0])
    return {"compute_type": compute, "batch1": single, "batch16_seconds": batched}


def _interleave(runners: dict[str, Any], make_prompt: Any, s: Settings) -> dict[str, list[dict[str, float]]]:
    """Alternate the runners on the same prompts (order flipped every round), after a warm-up."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for run in runners.values():
        run(make_prompt(0), s.warmup_new_tokens)
    for r in range(s.overhead_runs):
        names = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in names:
            out[name].append(runners[name](make_prompt(r + 1), s.new_tokens).to_dict())
    return out


def job_bandwidth(job: dict[str, Any]) -> dict[str, Any]:
    """Memory read bandwidth: numpy reductions (sum, max) over 1 GiB of float32, best of
    several, with 1 and THREADS threads (numpy releases the GIL in reductions)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(2**28, dtype=np.float32)  # 1 GiB: far beyond any cache

    def best(fn: Any, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return data.nbytes / min(times) / 1e9

    out: dict[str, Any] = {"bytes": int(data.nbytes)}
    for threads in (1, THREADS):
        parts = np.array_split(data, threads)
        with ThreadPoolExecutor(threads) as pool:
            out[f"gbps_{threads}_thread{'s' if threads > 1 else ''}"] = max(
                best(lambda kernel=kernel, parts=parts: list(pool.map(kernel, parts))) for kernel in (np.sum, np.max)
            )
    return out


JOBS = {
    "prepare": job_prepare,
    "generate": job_generate,
    "overhead_llama": job_overhead_llama,
    "overhead_ct2": job_overhead_ct2,
    "bandwidth": job_bandwidth,
}


# -- the measuring (parent) process -------------------------------------------------------


def summarize_batch1(children: list[ChildResult]) -> dict[str, Any]:
    runs = [r for c in children for r in c.result["runs"]]
    return {
        "load_s": median(c.result["load_s"] for c in children),
        "peak_rss_mib": median(c.peak_rss / harness.MIB for c in children),
        "ttft_s": median(r["ttft"] for r in runs),
        "prompt_tps": median(r["prompt_tps"] for r in runs),
        "decode_tps": median(r["decode_tps"] for r in runs),
        "generate_s": median(r["seconds"] for r in runs),
        "decode_spread": spread(r["decode_tps"] for r in runs),
        "new_tokens": runs[0]["new_tokens"],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "samples": len(runs),
        "processes": len(children),
        "bytes_per_token": children[0].result["bytes_per_token"],
    }


def summarize_batch(children: list[ChildResult]) -> dict[str, Any]:
    runs = [r for c in children for r in c.result["runs"]]
    return {
        "peak_rss_mib": median(c.peak_rss / harness.MIB for c in children),
        "seconds": median(r["seconds"] for r in runs),
        "tokens_per_s": median(r["new_tokens"] / r["seconds"] for r in runs),
        "new_tokens": runs[0]["new_tokens"],
        "prompt_tokens": children[0].result["prompt_tokens"],
        "samples": len(runs),
    }


def measure_variant(v: Variant, s: Settings, rebuild: bool, bandwidth: float) -> dict[str, Any]:
    """All processes of one variant (batch 1, and batched for the T5 family), or why not."""
    row: dict[str, Any] = {"variant": v.to_dict()}
    source = source_folder(v.model)
    try:
        if v.engine == "transformers":
            path, row["file_bytes"] = source, harness.checkpoint_weight_bytes(source)
        elif v.is_auto:  # PocketLM converts the folder into its cache on first use: not measured
            path, prepared = (
                source,
                run_child(SCRIPT, {"kind": "prepare", "path": str(source)}, timeout_s=s.child_timeout_s).result,
            )
            row["file_bytes"], row["converted"] = prepared["file_bytes"], Path(prepared["path"]).name
        else:
            path = artifact(v.model, v.format, v.quant, rebuild)
            row["file_bytes"] = path_bytes(path)
        job = {
            "kind": "generate",
            "variant": v.to_dict(),
            "settings": s.__dict__,
            "source": str(source),
            "path": str(path),
        }
        ones = [
            run_child(SCRIPT, job | {"process": p, "batch": False}, v.env, s.child_timeout_s)
            for p in range(s.processes)
        ]
        row["batch1"] = summarize_batch1(ones)
        row["info"], row["compute_type"] = ones[0].result.get("info"), ones[0].result.get("compute_type")
        per_token = row["batch1"]["bytes_per_token"]["total"]
        row["roofline_fraction"] = row["batch1"]["decode_tps"] * per_token / (bandwidth * 1e9) if bandwidth else None
    except (ArtifactError, RuntimeError) as e:
        row["error"] = error_line(e)
        return row
    if is_seq2seq(v.model):
        try:
            batches = [
                run_child(SCRIPT, job | {"process": p, "batch": True}, v.env, s.child_timeout_s)
                for p in range(s.batch_processes)
            ]
            row["batch"] = summarize_batch(batches)
        except RuntimeError as e:
            row["batch_error"] = error_line(e)
    return row


BETTER = {"decode_tps": max, "prompt_tps": max, "ttft_s": min, "peak_rss_mib": min, "load_s": min}


def baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The transformers figures each ratio is taken against: per metric, the better run."""
    runs = [r for r in rows if r["variant"]["engine"] == "transformers" and "batch1" in r]
    if not runs:
        return None
    out: dict[str, Any] = {k: pick(r["batch1"][k] for r in runs) for k, pick in BETTER.items()}
    out["file_bytes"] = runs[0]["file_bytes"]
    batch = [r["batch"]["tokens_per_s"] for r in runs if "batch" in r]
    out["batch_tokens_per_s"] = max(batch) if batch else None
    return out


def add_ratios(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> None:
    """Each PocketLM variant against the transformers baseline measured in the same run."""
    if base is None:
        return
    for row in rows:
        if "batch1" not in row or row["variant"]["engine"] == "transformers":
            continue
        r = row["batch1"]
        row["vs_baseline"] = {
            "decode": ratio(r["decode_tps"], base["decode_tps"]),
            "prompt": ratio(r["prompt_tps"], base["prompt_tps"]),
            "ttft": ratio(r["ttft_s"], base["ttft_s"]),
            "peak_rss": ratio(r["peak_rss_mib"], base["peak_rss_mib"]),
            "load": ratio(r["load_s"], base["load_s"]),
            "file": ratio(row["file_bytes"], base["file_bytes"]),
        }
        if "batch" in row:
            row["vs_baseline"]["batch"] = ratio(row["batch"]["tokens_per_s"], base["batch_tokens_per_s"])


def measure_overhead(model: str, s: Settings, rebuild: bool) -> dict[str, Any]:
    """The runtime's overhead over the engine it drives, for the variant users get by default."""
    seq2seq = is_seq2seq(model)
    try:
        path = artifact(model, "ct2" if seq2seq else "gguf", CT2_FILE if seq2seq else "q4_k_m", rebuild)
        kind = "overhead_ct2" if seq2seq else "overhead_llama"
        res = run_child(
            SCRIPT,
            {"kind": kind, "model": model, "path": str(path), "settings": s.__dict__},
            timeout_s=s.child_timeout_s,
        ).result
    except (ArtifactError, RuntimeError) as e:
        return {"model": model, "error": error_line(e)}
    single = res["batch1"] if seq2seq else res
    out: dict[str, Any] = {"model": model, "file": path.name, "compute_type": res.get("compute_type"), "batch1": {}}
    ours = single["pocketlm"]
    for name, runs in single.items():
        out["batch1"][name] = {
            "generate_s": median(r["seconds"] for r in runs),
            "decode_tps": median(r["decode_tps"] for r in runs),
            "ttft_s": median(r["ttft"] for r in runs),
        }
    for name, stats in out["batch1"].items():
        if name != "pocketlm":
            stats["pocketlm_overhead"] = ratio(out["batch1"]["pocketlm"]["generate_s"], stats["generate_s"]) - 1
            stats["pocketlm_decode_overhead"] = ratio(stats["decode_tps"], out["batch1"]["pocketlm"]["decode_tps"]) - 1
    if seq2seq:
        secs = {k: median(v) for k, v in res["batch16_seconds"].items()}
        out["batch16"] = {
            "seconds": secs,
            "pocketlm_overhead": ratio(secs["pocketlm"], secs["Translator.translate_batch"]) - 1,
        }
    out["samples"] = len(ours)
    return out


def import_time(s: Settings) -> dict[str, Any]:
    """`import pocketlm` in fresh interpreters (after one unmeasured run that writes .pyc files)."""
    import subprocess

    code = "import time; t = time.perf_counter(); import pocketlm; print(time.perf_counter() - t)"
    samples = []
    for i in range(s.import_repeats + 1):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=harness.child_env()
        )
        if i:
            samples.append(float(out.stdout.strip().splitlines()[-1]))
    return {"seconds": median(samples), "samples": samples}


def evaluate_targets(
    models: dict[str, list[dict[str, Any]]],
    baselines: dict[str, dict[str, Any] | None],
    overhead: list[dict[str, Any]],
    imp: dict[str, Any],
) -> list[dict[str, Any]]:
    """The issue's targets, each met / not met / not measured, with the numbers behind it."""
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: float | None, met: bool | None, detail: str = "") -> None:
        out.append({"name": name, "target": target, "value": value, "met": met, "detail": detail})

    def find(model: str, pred: Any) -> dict[str, Any] | None:
        return next((r for r in models.get(model, []) if "vs_baseline" in r and pred(_variant(r))), None)

    bloom = find("bloomz-560m", lambda v: v.format == "gguf" and v.quant == "q4_k_m")
    dec = bloom["vs_baseline"]["decode"] if bloom else None
    rss = bloom["vs_baseline"]["peak_rss"] if bloom else None
    add(
        "bloomz-560m q4_k_m decode speed vs transformers",
        f">= {TARGETS['bloom_decode']:g}x",
        dec,
        None if dec is None else dec >= TARGETS["bloom_decode"],
        _numbers(bloom, baselines.get("bloomz-560m"), "decode_tps", "tok/s"),
    )
    add(
        "bloomz-560m q4_k_m peak RSS vs transformers",
        f"<= {TARGETS['bloom_rss']:g}x",
        rss,
        None if rss is None else rss <= TARGETS["bloom_rss"],
        _numbers(bloom, baselines.get("bloomz-560m"), "peak_rss_mib", "MiB"),
    )
    for o in overhead:
        for name, stats in o.get("batch1", {}).items():
            if name in ("raw C API loop", "Translator.generate_tokens"):
                value = stats["pocketlm_overhead"]
                add(
                    f"{o['model']}: PocketLM generate overhead over {name}",
                    f"<= {TARGETS['overhead']:.0%}",
                    value,
                    value <= TARGETS["overhead"],
                    f"{o['batch1']['pocketlm']['generate_s']:.3f} s vs {stats['generate_s']:.3f} s per generation "
                    f"(median of {o['samples']})",
                )
        if "batch16" in o:
            value = o["batch16"]["pocketlm_overhead"]
            secs = o["batch16"]["seconds"]
            add(
                f"{o['model']}: PocketLM batch overhead over Translator.translate_batch",
                f"<= {TARGETS['overhead']:.0%}",
                value,
                value <= TARGETS["overhead"],
                f"{secs['pocketlm']:.3f} s vs {secs['Translator.translate_batch']:.3f} s per batch (median of "
                f"{o['samples']})",
            )
    for model in ("flan-t5-small", "mt0-large"):
        auto = find(model, lambda v: v.is_auto)
        value = auto["vs_baseline"]["decode"] if auto else None
        detail = _numbers(auto, baselines.get(model), "decode_tps", "tok/s")
        if auto:
            detail += "; " + _pick_note(auto, models[model])
            if "batch" in auto.get("vs_baseline", {}):
                detail += f"; batched: {auto['vs_baseline']['batch']:.1f}x transformers' padded batch"
        add(
            f"{model} decode at batch 1 vs transformers (runtime's own pick)",
            f">= {TARGETS['t5_decode']:g}x",
            value,
            None if value is None else value >= TARGETS["t5_decode"],
            detail,
        )
    add(
        "`import pocketlm`",
        f"< {TARGETS['import_s']:g} s",
        imp.get("seconds"),
        None if imp.get("seconds") is None else imp["seconds"] < TARGETS["import_s"],
        f"median of {len(imp.get('samples', []))} fresh interpreters",
    )
    return out


def _variant(row: dict[str, Any]) -> Variant:
    return Variant.from_dict(row["variant"])


def _numbers(row: dict[str, Any] | None, base: dict[str, Any] | None, key: str, unit: str) -> str:
    if not row or not base:
        return "not measured"
    return f"{row['batch1'][key]:.1f} {unit} vs {base[key]:.1f} {unit}"


def _pick_note(auto: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What pocketlm.load(checkpoint) picked, and how it ranks among the PocketLM variants
    measured, at batch 1 and for the 16-prompt batch (CTranslate2 compute types compared as
    they ran: "int8" runs as "int8_float32" on this CPU)."""
    info, picked_compute = auto["info"], auto.get("compute_type")
    pick = f"{info['backend']} {info['quant']}" + (f" compute {picked_compute}" if picked_compute else "")
    notes = [f"picked {pick}"]
    for label, section, key in (("batch 1", "batch1", "decode_tps"), ("16-prompt batch", "batch", "tokens_per_s")):
        measured = [
            (r[section][key], r)
            for r in rows
            if section in r and r["variant"]["engine"] == "pocketlm" and not _variant(r).is_auto
        ]
        if not measured:
            continue
        best_tps, best = max(measured, key=lambda m: m[0])
        same = [
            t
            for t, r in measured
            if r["variant"]["format"] == info["format"]
            and r["variant"]["quant"] == info["quant"]
            and r.get("compute_type") == picked_compute
        ]
        own = auto.get(section, {}).get(key)
        # The picked configuration was also measured as a file variant: judge it by its best run.
        picked_tps = max(same + ([own] if own is not None else []), default=None)
        if picked_tps is None:
            continue
        if picked_tps >= best_tps:
            notes.append(f"{label}: the fastest PocketLM variant measured ({picked_tps:.1f} tok/s)")
        else:
            notes.append(
                f"{label}: {picked_tps:.1f} tok/s, fastest measured {best['variant']['label']} "
                f"({best_tps:.1f} tok/s, {best_tps / picked_tps - 1:+.0%})"
            )
    return "; ".join(notes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one process per variant (noisy)")
    parser.add_argument("--models", nargs="*", default=list(REAL_SHAPES), choices=list(REAL_SHAPES))
    parser.add_argument("--rebuild", action="store_true", help="convert the models again (after converter changes)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="measure nothing: re-evaluate the targets of the last run in this mode "
        "(after changing how they are judged)",
    )
    parser.add_argument(
        "--keep-others", action="store_true", help="keep the other models' results from the last run in the same mode"
    )
    args = parser.parse_args(argv)
    s = harness.settings(args.quick)
    if args.targets_only:
        return retarget(s, args.no_report)
    started = time.perf_counter()

    models: dict[str, list[dict[str, Any]]] = {}
    baselines: dict[str, dict[str, Any] | None] = {}
    overhead: list[dict[str, Any]] = []
    kept: dict[str, str] = {}
    prev = harness.previous_result("speed", s.mode) if args.keep_others else None
    if prev:
        models = {m: rows for m, rows in prev["models"].items() if m not in args.models}
        baselines = {m: b for m, b in prev["baselines"].items() if m in models}
        overhead = [o for o in prev["overhead"] if o["model"] in models]
        kept = {m: prev.get("kept", {}).get(m, prev["date"]) for m in models}

    print(f"[{s.mode}] memory bandwidth...", flush=True)
    bw = run_child(SCRIPT, {"kind": "bandwidth"}).result
    bandwidth = max(v for k, v in bw.items() if k.startswith("gbps"))
    print(f"  {bandwidth:.1f} GB/s", flush=True)
    imp = import_time(s)
    print(f"  import pocketlm: {imp['seconds']:.3f} s", flush=True)

    for model in args.models:
        print(f"[{s.mode}] {model}", flush=True)
        rows = models[model] = []
        for v in variants(model):
            row = measure_variant(v, s, args.rebuild, bandwidth)
            rows.append(row)
            print("  " + describe(row), flush=True)
        baselines[model] = baseline(rows)
        add_ratios(rows, baselines[model])
        overhead.append(measure_overhead(model, s, args.rebuild))
        print("  overhead: " + str({k: v for k, v in overhead[-1].items() if k != "batch1"}), flush=True)

    models = {m: models[m] for m in REAL_SHAPES if m in models}
    overhead.sort(key=lambda o: REAL_SHAPES.index(o["model"]))
    payload = {
        "mode": s.mode,
        "settings": s.__dict__,
        "threads": THREADS,
        "command": "python benchmarks/speed_bench.py " + " ".join(argv),
        "machine_details": harness.machine_details(),
        "bandwidth": bw | {"best_gbps": bandwidth},
        "import_runtime": imp,
        "kept": kept,
        "models": models,
        "baselines": baselines,
        "overhead": overhead,
        "targets": evaluate_targets(models, baselines, overhead, imp),
        "wall_s": time.perf_counter() - started,
    }
    path = harness.write_result("speed", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s", flush=True)
    return finish(payload, args.no_report)


def retarget(s: harness.Settings, no_report: bool) -> int:
    """Judge the last run's measurements again, unchanged, with the current target rules."""
    payload = harness.previous_result("speed", s.mode)
    if not payload:
        print(f"no {s.mode} speed results to re-evaluate: run benchmarks/speed_bench.py first", file=sys.stderr)
        return 1
    payload["targets"] = evaluate_targets(
        payload["models"], payload["baselines"], payload["overhead"], payload["import_runtime"]
    )
    print(f"re-evaluated targets of {harness.write_result('speed', payload)}", flush=True)
    return finish(payload, no_report)


def finish(payload: dict[str, Any], no_report: bool) -> int:
    for t in payload["targets"]:
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  target {t['name']} {t['target']}: {status} ({t['detail']})")
    if not no_report:
        import report

        report.main([])
    return 0


def describe(row: dict[str, Any]) -> str:
    label = row["variant"]["label"]
    if "error" in row:
        return f"{label}: unavailable: {row['error']}"
    b = row["batch1"]
    text = (
        f"{label}: load {b['load_s']:.2f} s, rss {b['peak_rss_mib']:.0f} MiB, ttft {b['ttft_s']:.3f} s, "
        f"pp {b['prompt_tps']:.1f} tok/s, decode {b['decode_tps']:.1f} tok/s"
    )
    if "batch" in row:
        text += f", batch {row['batch']['tokens_per_s']:.1f} tok/s"
    elif "batch_error" in row:
        text += f", batch unavailable: {row['batch_error']}"
    return text


if __name__ == "__main__":
    if not child_main(JOBS):
        sys.exit(main(sys.argv[1:]))
