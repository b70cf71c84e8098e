"""Beam search speed (issue 16): PocketLM's 4-beam decoding next to transformers' 4-beam
`generate` (fp32, CPU) measured in the same run, and what beams cost over greedy decoding.

For each model (bloomz-560m GGUF q4_k_m on llama.cpp; flan-t5-small CTranslate2 int8 and GGUF
q8_0; mt0-large CTranslate2 int8; random weights of the published shapes, see common.py),
each variant in its own fresh processes (variants interleaved process by process): one
warm-up, then rounds of one greedy and one 4-beam generation (order flipped every round), each
on a prompt of its own, exactly N new tokens (`min_new_tokens = max_new_tokens = N`: end of
sequence is masked for every beam until N, in PocketLM as in transformers), num_beams=4,
early_stopping=True, length_penalty=1.0, one returned sequence. tok/s = new tokens of the
returned sequence / wall time of the call (prompt included), for greedy and beams alike.

On llama.cpp, beams are sequences of one batch sharing the prompt's KV cells, so a step of 4
beams should cost well under 4 greedy steps: the children time every llama.cpp call
(`LlamaSession.evaluate`: batch filling, llama_decode, logits copy) and CTranslate2's
translate_batch, so the report can say how much of a beam step is the engine and how much
PocketLM's search in Python (log-softmax over the vocabulary per beam, top-k over all beams),
and profile one more 4-beam generation per llama.cpp variant (cProfile). For the CTranslate2
variants, CTranslate2 is also called directly with 1 and with 2 intra threads. Before each
child the script waits for the machine to be idle, and records other processes' CPU time
while it ran (a child measured on a busy machine is measured again).

    .venv/bin/python benchmarks/beam_bench.py --quick          # a few minutes, noisy
    .venv/bin/python benchmarks/beam_bench.py                  # full
    .venv/bin/python benchmarks/beam_bench.py --quick --models bloomz-560m
Writes benchmarks/results/beams.json, then regenerates benchmarks/README.md (report.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
from harness import THREADS, ArtifactError, error_line, is_seq2seq, median, run_child, spread

SCRIPT = Path(__file__).resolve()
NUM_BEAMS = 4
TARGET_BEAM_COST = 4.0  # llama.cpp: 4-beam time / greedy time, "well under 4x"


@dataclass(frozen=True)
class BeamSettings:
    quick: bool
    prompt_tokens: int
    new_tokens: int
    warmup_new_tokens: int
    processes: int  # fresh processes per variant
    rounds: int  # (greedy, beams) pairs per process
    child_timeout_s: int

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


QUICK = BeamSettings(
    True, prompt_tokens=32, new_tokens=16, warmup_new_tokens=4, processes=1, rounds=2, child_timeout_s=900
)
FULL = BeamSettings(
    False, prompt_tokens=128, new_tokens=64, warmup_new_tokens=8, processes=2, rounds=3, child_timeout_s=1800
)

# model -> its variants: (label, engine, format, quant); transformers is the baseline
MODELS: dict[str, list[tuple[str, str, str, str]]] = {
    "bloomz-560m": [
        ("GGUF q4_k_m, llama.cpp", "pocketlm", "gguf", "q4_k_m"),
        ("transformers fp32", "transformers", "hf", "fp32"),
    ],
    "flan-t5-small": [
        ("CT2 int8, CTranslate2", "pocketlm", "ct2", "int8"),
        ("GGUF q8_0, llama.cpp", "pocketlm", "gguf", "q8_0"),
        ("transformers fp32", "transformers", "hf", "fp32"),
    ],
    "mt0-large": [
        ("CT2 int8, CTranslate2", "pocketlm", "ct2", "int8"),
        ("transformers fp32", "transformers", "hf", "fp32"),
    ],
}
QUICK_MODELS = ("bloomz-560m", "flan-t5-small")


# -- child jobs -------------------------------------------------------------------------------


class EngineClock:
    """Times the engine calls of a loaded PocketLM model without changing what runs: llama.cpp's
    `LlamaSession.evaluate` (each call: sequences, tokens, encode or decode, seconds), or
    CTranslate2's translate_batch / generate_tokens."""

    def __init__(self, model: Any):
        self.calls: list[dict[str, Any]] = []
        self.model = model
        engine = model.engine  # the engine's own library calls are what is timed
        if hasattr(engine, "_s") and hasattr(engine._s, "evaluate"):
            self.kind = "llama.cpp"
            self._wrap_llama(engine._s)
        elif hasattr(engine, "_translator"):
            self.kind = "ctranslate2"
            self._original = engine._translator
            engine._translator = _TimedTranslator(engine._translator, self.calls)
        else:
            self.kind = "unknown"

    def _wrap_llama(self, session: Any) -> None:
        evaluate = session.evaluate

        def timed(entries: Any, encode: bool = False) -> Any:
            started = time.perf_counter()
            try:
                return evaluate(entries, encode=encode)
            finally:
                self.calls.append(
                    {
                        "seconds": time.perf_counter() - started,
                        "sequences": len(entries),
                        "tokens": sum(len(tokens) for _, tokens, _, _ in entries),
                        "encode": encode,
                    }
                )

        session.evaluate = timed

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls[:] = list(self.calls), []
        return calls

    def restore(self) -> None:
        if self.kind == "ctranslate2":
            self.model.engine._translator = self._original


class _TimedTranslator:
    """A ctranslate2.Translator whose decoding calls are timed (everything else passes through)."""

    def __init__(self, inner: Any, calls: list[dict[str, Any]]):
        self._inner, self._calls = inner, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def translate_batch(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._inner.translate_batch(*args, **kwargs)
        finally:
            self._calls.append(
                {
                    "seconds": time.perf_counter() - started,
                    "call": "translate_batch",
                    "beam_size": kwargs.get("beam_size", 1),
                }
            )

    def generate_tokens(self, *args: Any, **kwargs: Any) -> Any:
        steps = self._inner.generate_tokens(*args, **kwargs)
        spent = 0.0
        try:
            while True:
                started = time.perf_counter()
                try:
                    step = next(steps)
                except StopIteration:
                    spent += time.perf_counter() - started
                    return
                spent += time.perf_counter() - started
                yield step
        finally:
            self._calls.append({"seconds": spent, "call": "generate_tokens", "beam_size": 1})


def beam_options(n: int) -> dict[str, Any]:
    """Exactly n new tokens with 4 beams (every beam runs n steps), one sequence returned."""
    return dict(
        max_new_tokens=n,
        min_new_tokens=n,
        num_beams=NUM_BEAMS,
        early_stopping=True,
        length_penalty=1.0,
        num_return_sequences=1,
    )


def greedy_options(n: int) -> dict[str, Any]:
    return dict(max_new_tokens=n, min_new_tokens=n, num_beams=1)


class PocketLMBeams:
    def __init__(self, path: Path):
        import pocketlm

        self.model = pocketlm.load(path, threads=THREADS)
        self.clock = EngineClock(self.model)

    def run(self, ids: list[int], n: int, beams: bool) -> dict[str, Any]:
        options = beam_options(n) if beams else greedy_options(n)
        self.clock.take()
        started = time.perf_counter()
        r = self.model.generate(ids, temperature=0.0, no_repeat_ngram_size=0, repetition_penalty=1.0, **options)
        seconds = time.perf_counter() - started
        return {
            "seconds": seconds,
            "new_tokens": len(r.token_ids),
            "prompt_tokens": len(ids),
            "finish_reason": r.finish_reason,
            "score": r.score,
            "first_token_seconds": r.first_token_seconds,
            "engine_calls": self.clock.take(),
        }


class TransformersBeams:
    def __init__(self, source: Path, seq2seq: bool):
        import engines

        self.model = engines.load_transformers(source, seq2seq)
        self.seq2seq = seq2seq

    def run(self, ids: list[int], n: int, beams: bool) -> dict[str, Any]:
        import torch

        options = beam_options(n) if beams else greedy_options(n)
        x = torch.tensor([ids])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                no_repeat_ngram_size=0,
                repetition_penalty=1.0,
                output_scores=False,
                return_dict_in_generate=True,
                **options,
            )
        seconds = time.perf_counter() - started
        seq = out.sequences[0].tolist()
        new = seq[1:] if self.seq2seq else seq[len(ids) :]  # (no padding: every beam runs n steps)
        score = getattr(out, "sequences_scores", None)
        return {
            "seconds": seconds,
            "new_tokens": len(new),
            "prompt_tokens": len(ids),
            "score": float(score[0]) if score is not None else None,
        }


def job_measure(job: dict[str, Any]) -> dict[str, Any]:
    """One variant in this process: load, warm up (both modes), then the rounds."""
    from harness import prompt, text_ids

    s = BeamSettings(**job["settings"])
    model, engine = job["model"], job["engine"]
    seq2seq = is_seq2seq(model)
    eos = int(harness.model_config(model)["eos_token_id"]) if seq2seq else None
    ids = text_ids()
    started = time.perf_counter()
    runner: Any = (
        TransformersBeams(Path(job["path"]), seq2seq) if engine == "transformers" else PocketLMBeams(Path(job["path"]))
    )
    out: dict[str, Any] = {"load_s": time.perf_counter() - started}
    if engine == "pocketlm":
        info = runner.model.info
        out["info"] = {"backend": info.backend, "format": info.format, "quant": info.quant, "n_ctx": info.n_ctx}
        out["engine_clock"] = runner.clock.kind
    # prompt numbers: the same for every variant (same process and round), distinct per call,
    # so no engine reuses a cached prefix and PocketLM and transformers decode the same prompts
    base = 1 + 100 * job["process"]
    for beams in (False, True):
        runner.run(prompt(ids, s.prompt_tokens, base + 90 + beams, eos), s.warmup_new_tokens, beams)
    out["greedy"], out["beams"] = [], []
    for r in range(s.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for beams in order:
            p = prompt(ids, s.prompt_tokens, base + 2 * r + beams, eos)
            out["beams" if beams else "greedy"].append(runner.run(p, s.new_tokens, beams))
    if engine == "pocketlm":
        if job.get("profile"):
            out["profile"] = profile_beams(runner, prompt(ids, s.prompt_tokens, base + 80, eos), s.new_tokens)
        runner.clock.restore()
    return out


def profile_beams(runner: PocketLMBeams, ids: list[int], n: int, top: int = 12) -> dict[str, Any]:
    """One more 4-beam generation (not in the figures) under cProfile: the functions that take
    the most time of their own (the engine call, numpy on the vocabulary, ...)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    runner.run(ids, n, True)
    profiler.disable()
    seconds = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else ""
        rows.append(
            {"function": f"{where}({name})" if where else name, "calls": calls, "own_s": own, "cum_s": cumulative}
        )
    rows.sort(key=lambda r: -r["own_s"])
    return {"seconds": seconds, "new_tokens": n, "top": rows[:top]}


def job_ct2_threads(job: dict[str, Any]) -> dict[str, Any]:
    """CTranslate2 called directly (ctranslate2.Translator, compute int8_float32 as PocketLM picks
    on CPU) with 1 and with 2 intra threads, one translator loaded at a time, in turn (1, 2, 1, 2):
    greedy (translate_batch beam_size=1) and 4-beam calls on the same prompts as the measured runs.
    Says whether the engine's own threading, not PocketLM, sets the CTranslate2 figures. (Two
    translators loaded at once slow each other down: measured, so they are not.)"""
    import json

    import ctranslate2
    from harness import prompt, text_ids

    s = BeamSettings(**job["settings"])
    path = Path(job["path"])
    vocab = json.loads((path / "shared_vocabulary.json").read_text())
    eos = int(harness.model_config(job["model"])["eos_token_id"])
    ids = text_ids()
    n = s.new_tokens
    out: dict[str, Any] = {str(t): {"greedy": [], "beams": []} for t in (1, 2)}
    warm = [vocab[i] for i in prompt(ids, s.prompt_tokens, 190, eos)]
    for _ in range(2):
        for threads in (1, 2):
            translator = ctranslate2.Translator(
                str(path), device="cpu", intra_threads=threads, inter_threads=1, compute_type="int8_float32"
            )
            for beams in (1, NUM_BEAMS):
                translator.translate_batch([warm], beam_size=beams, max_decoding_length=s.warmup_new_tokens)
            for r in range(s.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                for beams in order:
                    source = [vocab[i] for i in prompt(ids, s.prompt_tokens, 1 + 2 * r + beams, eos)]
                    started = time.perf_counter()
                    translator.translate_batch(
                        [source], beam_size=NUM_BEAMS if beams else 1, max_decoding_length=n, min_decoding_length=n
                    )
                    out[str(threads)]["beams" if beams else "greedy"].append(time.perf_counter() - started)
            del translator
    return out


JOBS = {"measure": job_measure, "ct2_threads": job_ct2_threads}


# -- the measuring (parent) process -------------------------------------------------------------


def _busy_seconds() -> float | None:
    """CPU seconds every process of the machine has used (the first line of /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def others_share(seconds: float = 2.0) -> float | None:
    """Share of the machine's CPUs other processes use now, sampled over `seconds`."""
    busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
    time.sleep(seconds)
    after = _busy_seconds()
    if busy is None or after is None:
        return None
    spent = after - busy - (_own_seconds() - own)
    return max(spent, 0.0) / ((time.perf_counter() - wall) * (os.cpu_count() or 1))


def wait_idle(threshold: float, max_wait_s: float) -> float:
    """Wait (at most max_wait_s) until other processes use under `threshold` of the CPUs for two
    samples in a row; the seconds waited."""
    started, calm = time.perf_counter(), 0
    while time.perf_counter() - started < max_wait_s:
        share = others_share()
        calm = calm + 1 if share is not None and share < threshold else 0
        if calm >= 2 or share is None:
            break
    return time.perf_counter() - started


def measured_child(job: dict[str, Any], timeout_s: int) -> tuple[harness.ChildResult, dict[str, Any]]:
    """run_child, and how busy the machine was meanwhile with anything else: other processes'
    CPU seconds / (wall seconds x CPUs), and the load average before and after."""
    busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
    load_before = os.getloadavg()[0]
    child = run_child(SCRIPT, job, timeout_s=timeout_s)
    wall, load_after = time.perf_counter() - wall, os.getloadavg()[0]
    after = _busy_seconds()
    others = None
    if busy is not None and after is not None:
        spent = after - busy - (_own_seconds() - own)
        others = max(spent, 0.0) / (wall * (os.cpu_count() or 1))
    return child, {
        "wall_s": wall,
        "other_cpu_share": others,
        "load_before": load_before,
        "load_after": load_after,
    }


def variant_path(model: str, engine: str, fmt: str, quant: str) -> Path:
    if engine == "transformers":
        return harness.source_folder(model)
    return harness.artifact(model, fmt, quant)


def summarize(children: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Medians over processes x rounds, per mode; engine time per step on llama.cpp."""
    out: dict[str, Any] = {"load_s": median(c["load_s"] for c in children)}
    for mode in ("greedy", "beams"):
        runs = [r for c in children for r in c[mode]]
        row: dict[str, Any] = {
            "seconds": median(r["seconds"] for r in runs),
            "tokens_per_s": median(r["new_tokens"] / r["seconds"] for r in runs),
            "spread": spread(r["seconds"] for r in runs),
            "new_tokens": sorted({r["new_tokens"] for r in runs}),
            "all_full_length": all(r["new_tokens"] == n for r in runs),
            "samples": len(runs),
            "seconds_each": [round(r["seconds"], 4) for r in runs],
        }
        calls = [r.get("engine_calls") for r in runs]
        if calls and all(c is not None for c in calls):
            row["engine"] = engine_summary(runs)
        out[mode] = row
    g, b = out["greedy"]["seconds"], out["beams"]["seconds"]
    out["beam_cost"] = b / g if g else None
    # the same ratio round by round (each pair ran one after the other in one process)
    pairs = [bb["seconds"] / gg["seconds"] for c in children for gg, bb in zip(c["greedy"], c["beams"])]
    out["beam_cost_pairs"] = [round(x, 3) for x in pairs]
    return out


def engine_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a generation's time goes: the engine's calls (llama.cpp: the prompt's, then one per
    decoding step with every running sequence) and the rest (PocketLM in Python)."""
    per_run = []
    for r in runs:
        calls = r["engine_calls"]
        engine = sum(c["seconds"] for c in calls)
        item: dict[str, Any] = {"engine_s": engine, "other_s": r["seconds"] - engine}
        if calls and "sequences" in calls[0]:
            decode = [c for c in calls if not c["encode"]]
            prompt_calls = [c for c in calls if c["encode"]] + decode[:1]  # encoder (T5), then the prompt
            steps = decode[1:]
            item.update(
                prompt_s=sum(c["seconds"] for c in prompt_calls),
                steps=len(steps),
                step_engine_s=sum(c["seconds"] for c in steps) / len(steps) if steps else None,
                step_sequences=sorted({c["sequences"] for c in steps}),  # [4]: every step ran 4 beams
            )
            if steps:
                # everything after the prompt, per step: the engine's part and the rest
                after_prompt = r["seconds"] - item["prompt_s"]
                item["step_total_s"] = after_prompt / len(steps)
                item["step_other_s"] = item["step_total_s"] - item["step_engine_s"]
        per_run.append(item)
    keys = per_run[0].keys()
    out: dict[str, Any] = {}
    for k in keys:
        values = [p[k] for p in per_run]
        if all(isinstance(v, (int, float)) or v is None for v in values):
            out[k] = median(values)
        else:
            out[k] = values[0]
    out["engine_share"] = (
        out["engine_s"] / (out["engine_s"] + out["other_s"]) if out.get("engine_s") is not None else None
    )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short prompts and runs, one process (noisy)")
    parser.add_argument(
        "--models", nargs="*", choices=list(MODELS), help="default: all (--quick: " + ", ".join(QUICK_MODELS) + ")"
    )
    parser.add_argument("--keep-others", action="store_true", help="keep the last run's other models (same mode)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    parser.add_argument(
        "--idle",
        type=float,
        default=0.1,
        metavar="SHARE",
        help="before each process, wait until other processes use under SHARE of the CPUs (0: do not wait), and "
        "measure a process again (up to --retries times) when they used more meanwhile; default 0.1",
    )
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a process run on a busy machine")
    parser.add_argument("--max-wait", type=float, default=900, help="seconds to wait for an idle machine at most")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    models = args.models or list(QUICK_MODELS if args.quick else MODELS)
    started = time.perf_counter()
    print(f"[{s.mode}] load average {os.getloadavg()[0]:.2f}", flush=True)

    variants: list[tuple[str, tuple[str, str, str, str], Path | None, str | None]] = []
    for model in models:
        for v in MODELS[model]:
            try:
                variants.append((model, v, variant_path(model, *v[1:]), None))
            except (ArtifactError, RuntimeError) as e:
                variants.append((model, v, None, error_line(e)))
    children: dict[tuple[str, str], list[dict[str, Any]]] = {(m, v[0]): [] for m, v, _, _ in variants}
    errors: dict[tuple[str, str], str] = {(m, v[0]): err for m, v, _, err in variants if err}
    machine_load: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in children}
    for p in range(s.processes):  # variants interleaved: process p of each, then p + 1
        for model, (label, engine, _fmt, _quant), path, _ in variants:
            key = (model, label)
            if key in errors:
                continue
            job = {
                "kind": "measure",
                "model": model,
                "engine": engine,
                "path": str(path),
                "settings": asdict(s),
                "process": p,
                "profile": p == 0 and engine == "pocketlm" and _fmt == "gguf",
            }
            try:
                for attempt in range(args.retries + 1):
                    waited = wait_idle(args.idle, args.max_wait) if args.idle > 0 else 0.0
                    child, load = measured_child(job, s.child_timeout_s)
                    load |= {"waited_s": round(waited, 1), "attempt": attempt + 1}
                    busy = load["other_cpu_share"] is not None and load["other_cpu_share"] >= args.idle > 0
                    if not busy or attempt == args.retries:
                        break
                    print(
                        f"  {model} / {label}: other processes used {load['other_cpu_share']:.0%} of the CPUs "
                        "meanwhile: measured again",
                        flush=True,
                    )
            except RuntimeError as e:
                errors[key] = error_line(e)
                print(f"  {model} / {label}: unavailable: {errors[key]}", flush=True)
                continue
            children[key].append(child.result | {"peak_rss_mib": child.peak_rss / harness.MIB})
            machine_load[key].append(load)
            g, b = child.result["greedy"], child.result["beams"]
            print(
                f"  {model} / {label} (process {p + 1}/{s.processes}, {load['wall_s']:.0f} s, "
                f"other processes {load['other_cpu_share'] or 0:.0%} of the CPUs, waited {load['waited_s']:.0f} s "
                "for an idle machine): greedy "
                + ", ".join(f"{r['seconds']:.2f}" for r in g)
                + " s; 4 beams "
                + ", ".join(f"{r['seconds']:.2f}" for r in b)
                + " s",
                flush=True,
            )

    threads_probe: dict[str, Any] = {}
    for model, (_label, engine, fmt, _quant), path, err in variants:
        if engine != "pocketlm" or fmt != "ct2" or err:
            continue
        job = {"kind": "ct2_threads", "model": model, "path": str(path), "settings": asdict(s)}
        try:
            if args.idle > 0:
                wait_idle(args.idle, args.max_wait)
            child, load = measured_child(job, s.child_timeout_s)
        except RuntimeError as e:
            threads_probe[model] = {"error": error_line(e)}
            continue
        probe: dict[str, Any] = {"machine_load": load}
        for threads, modes in child.result.items():
            g, b = median(modes["greedy"]), median(modes["beams"])
            probe[threads] = {"greedy_s": g, "beams_s": b, "beam_cost": b / g if g else None, **modes}
        threads_probe[model] = probe
        print(
            f"  {model}: CTranslate2 directly, greedy / 4 beams: "
            + "; ".join(f"{t} thread(s) {probe[t]['greedy_s']:.2f} / {probe[t]['beams_s']:.2f} s" for t in ("1", "2")),
            flush=True,
        )

    results: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        rows = results[model] = []
        for label, engine, fmt, quant in MODELS[model]:
            key = (model, label)
            row: dict[str, Any] = {"label": label, "engine": engine, "format": fmt, "quant": quant}
            if children[key]:
                row |= summarize(children[key], s.new_tokens)
                row["info"] = children[key][0].get("info")
                row["peak_rss_mib"] = median(c["peak_rss_mib"] for c in children[key])
                row["machine_load"] = machine_load[key]
                row["profile"] = next((c["profile"] for c in children[key] if c.get("profile")), None)
                if key in errors:  # some processes failed: the others' figures are shown
                    row["partial_error"] = errors[key]
            elif key in errors:
                row["error"] = errors[key]
            rows.append(row)
        base = next((r for r in rows if r["engine"] == "transformers" and "beams" in r), None)
        for r in rows:
            if r["engine"] == "pocketlm" and "beams" in r and base:
                r["vs_transformers"] = {
                    "beams": harness.ratio(r["beams"]["tokens_per_s"], base["beams"]["tokens_per_s"]),
                    "greedy": harness.ratio(r["greedy"]["tokens_per_s"], base["greedy"]["tokens_per_s"]),
                }

    previous = harness.previous_result("beams", s.mode) if args.keep_others else None
    kept: dict[str, str] = {}
    if previous:
        for model, rows in previous["models"].items():
            if model not in results:
                results[model] = rows
                kept[model] = previous.get("kept", {}).get(model, previous["date"])
                if model in previous.get("ct2_threads", {}):
                    threads_probe[model] = previous["ct2_threads"][model]
    order = list(MODELS)
    results = {m: results[m] for m in sorted(results, key=order.index)}
    loads = [x for rows in machine_load.values() for x in rows]
    payload = {
        "mode": s.mode,
        "settings": asdict(s),
        "num_beams": NUM_BEAMS,
        "threads": THREADS,
        "command": "python benchmarks/beam_bench.py" + ("" if not argv else " " + " ".join(argv)),
        "machine_details": harness.machine_details(),
        "models": results,
        "kept": kept,
        "ct2_threads": threads_probe,
        "targets": targets(results),
        "other_cpu_share_max": max((x["other_cpu_share"] or 0 for x in loads), default=None),
        "load_average_max": max((max(x["load_before"], x["load_after"]) for x in loads), default=None),
        "idle_threshold": args.idle,
        "wall_s": time.perf_counter() - started,
    }
    path = harness.write_result("beams", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s", flush=True)
    for t in payload["targets"]:
        print(f"  {t['name']}: {t['value']:.2f}x ({'met' if t['met'] else 'NOT met'}, target {t['target']})")
    if not args.no_report:
        import report

        report.main([])
    return 0


def targets(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's expectation: on llama.cpp, 4 beams cost well under 4x greedy's time."""
    out = []
    for model, rows in results.items():
        for r in rows:
            if r["engine"] == "pocketlm" and r["format"] == "gguf" and r.get("beam_cost") is not None:
                out.append(
                    {
                        "name": f"{model} {r['label']}: 4-beam time / greedy time",
                        "target": f"< {TARGET_BEAM_COST:g}x",
                        "value": r["beam_cost"],
                        "met": r["beam_cost"] < TARGET_BEAM_COST,
                    }
                )
    return out


if __name__ == "__main__":
    if harness.child_main(JOBS):
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
