"""Per-step control (issue 27): what steering every token costs, against the same request
without the option, measured in the same process, interleaved.

Rows (ROWS) are a request option and the request it is compared with: seeded sampling against
the same sampling unseeded, presence/frequency penalties against plain greedy. Each row says
which engines it applies to; every model (MODELS) runs the rows of its engine. More rows
(constraints, logit_bias, on every engine) go into ROWS, with a `prepare` for what they need.

On CTranslate2 these requests are decoded by PocketLM's sampler (runtime/backends/
ctranslate2.py, CT2Engine._decode_stepwise): CTranslate2 decodes greedily and hands each step's
logits to a callback; where the sampler picks another token than CTranslate2's, that sequence is
decoded again from its prefix. So the cost depends on how often the sampler agrees with argmax,
reported per row (`agreed`: share of tokens that were CTranslate2's own guess; `restarts` per
token). Two more figures per CTranslate2 model, from the engine called directly:
- what a restart costs: the encoder and the prefix re-decoded (prefix of L tokens, then one
  new token), against one decoding step;
- `no restart`: every step's logits through the request's sampler in one translate_batch, its
  choices ignored: the cost of the same request if CTranslate2 let a Python logits hook choose
  each token (no such hook exists in CTranslate2 4.8), against unseeded sampling.

Each model runs in its own fresh process: one warm-up of every request, then rounds; in each
round every row runs its request without and with the option on the same prompt (a new prompt
every round), the order of rows and of the pair flipped every round. Exactly N new tokens
(`min_new_tokens = max_new_tokens = N`). Times are medians over rounds; the ratio is the median
of the per-round ratios. Random-weight models of the real shapes (common.py) and, with
--trained (or when it is already built), the trained T5 of reference_models.py on its task's
prompts.

    .venv/bin/python benchmarks/control_bench.py --quick        # minutes, noisy
    .venv/bin/python benchmarks/control_bench.py                # full
    .venv/bin/python benchmarks/control_bench.py --models flan-t5-small --trained
Writes benchmarks/results/control.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import THREADS, ArtifactError, error_line, median, run_child

SCRIPT = Path(__file__).resolve()
README = Path(__file__).resolve().parent / "README.md"
SECTION = "## Per-step control (issue 27)"
TARGET_CT2 = 3.0  # seeded sampling and penalties on CTranslate2: at most 3x the request without


@dataclass(frozen=True)
class Settings:
    quick: bool
    prompt_tokens: int
    new_tokens: int
    warmup_new_tokens: int
    rounds: int
    restart_repeats: int
    child_timeout_s: int

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


QUICK = Settings(
    True, prompt_tokens=32, new_tokens=64, warmup_new_tokens=4, rounds=2, restart_repeats=3, child_timeout_s=1800
)
FULL = Settings(
    False, prompt_tokens=32, new_tokens=64, warmup_new_tokens=4, rounds=5, restart_repeats=5, child_timeout_s=5400
)


@dataclass(frozen=True)
class Row:
    """A request option measured against the same request without it."""

    name: str
    base: dict[str, Any]  # the request without the option
    option: dict[str, Any]  # what the row adds
    engines: tuple[str, ...] = ("ctranslate2",)  # the backends it applies to
    target: float | None = TARGET_CT2  # at most this many times the request without
    no_restart: bool = False  # also measure CTranslate2 with a logits hook's cost (see the docstring)

    def options(self, n: int, with_option: bool) -> dict[str, Any]:
        return {"max_new_tokens": n, "min_new_tokens": n, **self.base, **(self.option if with_option else {})}


ROWS: list[Row] = [
    Row("seeded sampling (temperature 1)", {"temperature": 1.0}, {"seed": 1}, no_restart=True),
    Row("seeded sampling (temperature 0.7, top_p 0.9)", {"temperature": 0.7, "top_p": 0.9}, {"seed": 1}),
    Row("presence_penalty 0.5 (greedy)", {}, {"presence_penalty": 0.5}, no_restart=True),
    Row("frequency_penalty 0.5 (greedy)", {}, {"frequency_penalty": 0.5}),
    # constraints and logit_bias on every engine: add rows here (engines=("llama.cpp", "ctranslate2"), ...)
]


@dataclass(frozen=True)
class ModelSpec:
    label: str
    fmt: str
    quant: str
    backend: str
    trained: bool = False
    prompts: str = "text"  # "text": windows of the benchmark text's ids; "task": the trained T5's task
    notes: list[str] = field(default_factory=list)


MODELS: dict[str, ModelSpec] = {
    "flan-t5-small": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2"),
    "mt0-large": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2"),
    "trained-t5": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2", trained=True, prompts="task"),
}
QUICK_MODELS = ("flan-t5-small",)


# -- child jobs -------------------------------------------------------------------------------


def _prompts(model: Any, spec: dict[str, Any], s: Settings, count: int) -> list[list[int]]:
    """`count` prompts: windows of the benchmark text (random-weight models: any ids are
    noise to them), or the trained T5's own task ("sort: q d m a"), tokenized by the model."""
    if spec["prompts"] == "task":
        from reference_models import task_items

        return [model.tokenize(source) for source, _ in task_items("heldout")[:count]]
    from harness import prompt, text_ids

    eos = model.engine.end_ids()[0]
    ids = text_ids()
    return [prompt(ids, s.prompt_tokens, 1 + i, eos) for i in range(count)]


def _counts(model: Any) -> dict[str, int]:
    return dict(getattr(model.engine, "stepwise_counts", {}) or {})


def _timed(model: Any, ids: list[int], options: dict[str, Any]) -> dict[str, Any]:
    before = _counts(model)
    started = time.perf_counter()
    r = model.generate(ids, **options)
    seconds = time.perf_counter() - started
    after = _counts(model)
    out: dict[str, Any] = {"seconds": seconds, "new_tokens": len(r.token_ids)}
    if after:
        out["stepwise"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return out


def _no_restart(model: Any, ids: list[int], options: dict[str, Any]) -> float:
    """One translate_batch whose callback runs every step's logits through the request's
    sampler (its choice ignored: CTranslate2 keeps its own): the cost of this request if a
    logits hook let the sampler choose inside CTranslate2."""
    import numpy as np

    from pocketlm.core.generation import GenerationOptions

    engine = model.engine
    o = GenerationOptions(**options)
    seq = model.decoding(ids, o)
    decoded = [engine.start_token]

    def callback(step: Any) -> bool:
        row = np.array(np.asarray(step.logits).reshape(-1), dtype=np.float32)
        seq.sampler(row, decoded, generated=decoded[1:])
        decoded.append(step.token_id)
        return False

    started = time.perf_counter()
    with engine.lock:
        engine._translator.translate_batch(
            [engine._strings(ids)],
            target_prefix=[[]],
            max_decoding_length=o.max_new_tokens,
            min_decoding_length=o.min_new_tokens,
            max_input_length=0,
            beam_size=1,
            sampling_topk=1,
            return_logits_vocab=True,
            callback=callback,
        )
    return time.perf_counter() - started


def _restart_costs(model: Any, ids: list[int], s: Settings) -> dict[str, Any]:
    """CTranslate2 called directly: one decoding step, the encoder plus one step, a restart
    from a prefix of L tokens (re-decoded one position at a time, then one new token, the
    logits returned as the token-by-token path asks), and the same prefix decoded in one
    batched pass (return_alternatives: CTranslate2's only batched prefix) with how far its
    logits are from the first's (why it is not used)."""
    import numpy as np

    engine = model.engine
    tr = engine._translator
    source = engine._strings(ids)
    n = s.new_tokens
    greedy = tr.translate_batch([source], beam_size=1, max_decoding_length=n, min_decoding_length=n, max_input_length=0)
    tokens = greedy[0].hypotheses[0]

    def decode(length: int) -> Callable[[], Any]:
        return lambda: tr.translate_batch(
            [source], beam_size=1, max_decoding_length=length, min_decoding_length=length, max_input_length=0
        )

    def replay(prefix: int) -> Callable[[], Any]:
        return lambda: tr.translate_batch(
            [source],
            target_prefix=[tokens[:prefix]],
            beam_size=1,
            max_decoding_length=prefix + 1,
            min_decoding_length=0,
            max_input_length=0,
            return_logits_vocab=True,
            callback=lambda step: False,
        )

    def batched(prefix: int, rows: list[Any] | None = None) -> Callable[[], Any]:
        def keep(step: Any) -> bool:
            if rows is not None and step.logits.shape:
                rows.append(np.array(np.asarray(step.logits).reshape(-1), dtype=np.float32))
            return False

        return lambda: tr.translate_batch(
            [source],
            target_prefix=[tokens[: prefix - 1]],
            beam_size=1,
            return_alternatives=True,
            num_hypotheses=1,
            max_decoding_length=prefix + 1,
            min_decoding_length=0,
            max_input_length=0,
            return_logits_vocab=True,
            callback=keep,
        )

    lengths = (16, 32, n - 1)
    jobs: dict[str, Callable[[], Any]] = {"decode_1": decode(1), f"decode_{n}": decode(n)}
    jobs |= {f"restart_{length}": replay(length) for length in lengths}
    jobs[f"batched_{n - 1}"] = batched(n - 1)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    with engine.lock:
        for job in jobs.values():
            job()
        for r in range(s.restart_repeats):
            for name, job in jobs.items() if r % 2 == 0 else reversed(list(jobs.items())):
                started = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - started)
        # the logits after the prefix and the batched pass's next token, both ways
        rows: list[Any] = []
        batched(n - 1, rows)()
        alt = tr.translate_batch(
            [source],
            target_prefix=[tokens[: n - 2]],
            beam_size=1,
            return_alternatives=True,
            num_hypotheses=1,
            max_decoding_length=n,
            min_decoding_length=0,
            max_input_length=0,
        )[0].hypotheses[0]
    teacher = engine.logits(ids, [engine.start_token, *[engine._index[t] for t in alt]])[n - 1]
    med = {k: statistics.median(v) for k, v in times.items()}
    step = (med[f"decode_{n}"] - med["decode_1"]) / (n - 1)
    return {
        "step_s": step,
        "encoder_and_step_s": med["decode_1"],
        "restart_s": {str(length): med[f"restart_{length}"] for length in lengths},
        "restart_steps": {str(length): med[f"restart_{length}"] / step for length in lengths},
        "batched_restart_s": {str(n - 1): med[f"batched_{n - 1}"]},
        "batched_logits_error": float(np.abs(rows[0] - teacher).max() / np.abs(teacher).max()) if rows else None,
        "seconds_each": {k: [round(x, 5) for x in v] for k, v in times.items()},
    }


def job_measure(job: dict[str, Any]) -> dict[str, Any]:
    import pocketlm

    s = Settings(**job["settings"])
    rows = [r for r in ROWS if r.name in job["rows"]]
    started = time.perf_counter()
    model = pocketlm.load(job["path"], threads=THREADS)
    out: dict[str, Any] = {"load_s": time.perf_counter() - started}
    info = model.info
    out["info"] = {"backend": info.backend, "format": info.format, "quant": info.quant, "vocab_size": info.vocab_size}
    prompts = _prompts(model, job["spec"], s, s.rounds + 1)
    n = s.new_tokens
    for row in rows:  # warm-up
        for with_option in (False, True):
            model.generate(prompts[-1], **row.options(s.warmup_new_tokens, with_option))
    results: dict[str, dict[str, list[Any]]] = {r.name: {"base": [], "option": [], "no_restart": []} for r in rows}
    for r in range(s.rounds):
        flip = r % 2 == 1
        for row in reversed(rows) if flip else rows:
            pair = (True, False) if flip else (False, True)
            for with_option in pair:
                run = _timed(model, prompts[r], row.options(n, with_option))
                results[row.name]["option" if with_option else "base"].append(run)
            if row.no_restart and info.backend == "ctranslate2":
                results[row.name]["no_restart"].append(_no_restart(model, prompts[r], row.options(n, True)))
    out["rows"] = results
    if info.backend == "ctranslate2":
        out["restart"] = _restart_costs(model, prompts[0], s)
    model.close()
    return out


JOBS = {"measure": job_measure}


# -- the measuring (parent) process -------------------------------------------------------------


def measured_child(job: dict[str, Any], timeout_s: int) -> tuple[harness.ChildResult, dict[str, Any]]:
    """run_child, with the load average before and after and other processes' CPU share."""
    from beam_bench import _busy_seconds, _own_seconds

    busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
    load_before = os.getloadavg()[0]
    child = run_child(SCRIPT, job, timeout_s=timeout_s)
    wall, load_after = time.perf_counter() - wall, os.getloadavg()[0]
    after = _busy_seconds()
    others = None
    if busy is not None and after is not None:
        others = max(after - busy - (_own_seconds() - own), 0.0) / (wall * (os.cpu_count() or 1))
    return child, {"wall_s": wall, "other_cpu_share": others, "load_before": load_before, "load_after": load_after}


def summarize(row: Row, runs: dict[str, list[Any]], n: int) -> dict[str, Any]:
    base, option = runs["base"], runs["option"]
    ratios = [o["seconds"] / b["seconds"] for b, o in zip(base, option)]
    out: dict[str, Any] = {
        "row": row.name,
        "base_options": row.base,
        "option": row.option,
        "base_s": median(r["seconds"] for r in base),
        "option_s": median(r["seconds"] for r in option),
        "ratio": median(ratios),
        "ratios": [round(x, 3) for x in ratios],
        "all_full_length": all(r["new_tokens"] == n for r in base + option),
        "target": row.target,
    }
    steps = [r["stepwise"] for r in option if r.get("stepwise")]
    tokens = sum(x.get("tokens", 0) for x in steps)
    if tokens:
        calls = sum(x.get("calls", 0) for x in steps)
        out["agreed"] = sum(x.get("agreed", 0) for x in steps) / tokens
        out["restarts_per_token"] = (calls - len(steps)) / tokens
        out["calls_per_request"] = calls / len(steps)
    if runs["no_restart"]:
        out["no_restart_s"] = median(runs["no_restart"])
        out["no_restart_ratio"] = median(x / b["seconds"] for x, b in zip(runs["no_restart"], base))
    out["met"] = out["ratio"] <= row.target if row.target is not None and out["ratio"] is not None else None
    return out


def ensure_trained(build: bool) -> bool:
    """Whether the trained T5 is there (built now when `build`: about 12 min on 2 cores)."""
    from reference_models import TRAINED

    if (TRAINED / "trained-t5" / "training.json").is_file():
        return True
    if not build:
        return False
    import subprocess

    print("  training trained-t5 (reference_models.py, about 12 min)", flush=True)
    subprocess.run([sys.executable, str(SCRIPT.parent / "reference_models.py"), "--only", "t5"], check=True)
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, flan-t5-small only (noisy)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all (--quick: flan-t5-small)")
    parser.add_argument("--trained", action="store_true", help="train the reference T5 if it is not built yet")
    parser.add_argument("--keep-others", action="store_true", help="keep the last run's other models (same mode)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    models = args.models or list(QUICK_MODELS if args.quick else MODELS)
    started = time.perf_counter()
    print(f"[{s.mode}] load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {}
    for model in models:
        spec = MODELS[model]
        rows = [r for r in ROWS if spec.backend in r.engines]
        entry: dict[str, Any] = {"label": spec.label, "format": spec.fmt, "quant": spec.quant, "backend": spec.backend}
        results[model] = entry
        try:
            if spec.trained and not ensure_trained(args.trained or model in (args.models or [])):
                entry["error"] = "not built: run with --trained (reference_models.py trains it, about 12 min)"
                print(f"  {model}: {entry['error']}", flush=True)
                continue
            path = harness.artifact(model, spec.fmt, spec.quant)
        except (ArtifactError, RuntimeError, OSError) as e:
            entry["error"] = error_line(e)
            print(f"  {model}: unavailable: {entry['error']}", flush=True)
            continue
        job = {
            "kind": "measure",
            "model": model,
            "path": str(path),
            "spec": asdict(spec),
            "rows": [r.name for r in rows],
            "settings": asdict(s),
        }
        try:
            child, load = measured_child(job, s.child_timeout_s)
        except RuntimeError as e:
            entry["error"] = error_line(e)
            print(f"  {model}: failed: {entry['error']}", flush=True)
            continue
        r = child.result
        entry |= {
            "info": r["info"],
            "load_s": r["load_s"],
            "peak_rss_mib": child.peak_rss / harness.MIB,
            "machine_load": load,
            "rows": [summarize(row, r["rows"][row.name], s.new_tokens) for row in rows],
            "restart": r.get("restart"),
        }
        for x in entry["rows"]:
            extra = ""
            if "agreed" in x:
                extra = f"; agreed {x['agreed']:.0%}, {x['restarts_per_token']:.2f} restarts/token"
            if "no_restart_ratio" in x:
                extra += f"; no restart {x['no_restart_ratio']:.2f}x"
            print(
                f"  {model} {x['row']}: {x['base_s']:.2f} s -> {x['option_s']:.2f} s = {x['ratio']:.2f}x "
                f"(rounds {', '.join(f'{v:.2f}' for v in x['ratios'])}){extra}",
                flush=True,
            )
        if entry["restart"]:
            rc = entry["restart"]
            print(
                f"  {model} restart: step {rc['step_s'] * 1000:.1f} ms, encoder + step "
                f"{rc['encoder_and_step_s'] * 1000:.1f} ms, restart at "
                + ", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in rc["restart_s"].items())
                + f"; batched prefix {next(iter(rc['batched_restart_s'].values())) * 1000:.0f} ms, logits off by "
                f"{rc['batched_logits_error']:.1e}",
                flush=True,
            )
    previous = harness.previous_result("control", s.mode) if args.keep_others else None
    kept: dict[str, str] = {}
    if previous:
        for model, entry in previous["models"].items():
            if model not in results:
                results[model] = entry
                kept[model] = previous.get("kept", {}).get(model, previous["date"])
    order = list(MODELS)
    results = {m: results[m] for m in sorted(results, key=order.index)}
    payload = {
        "mode": s.mode,
        "settings": asdict(s),
        "threads": THREADS,
        "command": "python benchmarks/control_bench.py" + ("" if not argv else " " + " ".join(argv)),
        "machine_details": harness.machine_details(),
        "models": results,
        "kept": kept,
        "targets": targets(results),
        "wall_s": time.perf_counter() - started,
    }
    path = harness.write_result("control", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s", flush=True)
    for t in payload["targets"]:
        print(f"  {t['name']}: {t['value']:.2f}x ({'met' if t['met'] else 'NOT met'}, target {t['target']})")
    if not args.no_readme:
        write_section(section(payload))
    return 0


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for model, entry in results.items():
        for x in entry.get("rows", []):
            if x.get("target") is not None and x.get("ratio") is not None:
                out.append(
                    {
                        "name": f"{model} {entry['label']}: {x['row']}",
                        "target": f"<= {x['target']:g}x",
                        "value": x["ratio"],
                        "met": x["ratio"] <= x["target"],
                    }
                )
    return out


# -- the README section -------------------------------------------------------------------------


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f} ms"


def section(result: dict[str, Any]) -> list[str]:
    """The README section of results/control.json (kept by write_section)."""
    st = result["settings"]
    out = [
        SECTION,
        "",
        f"From `benchmarks/results/control.json` (`{result['command']}`, {result['mode']} mode, "
        f"{result['wall_s'] / 60:.0f} min, {result.get('date', '?')}); {result['threads']} threads. Each model in a "
        f"fresh process: a warm-up, then {st['rounds']} rounds in which every row runs the request without and "
        "with its option on the same prompt (a new prompt each round; rows and pairs in flipped order every "
        f"round), exactly {st['new_tokens']} new tokens (`min_new_tokens = max_new_tokens`); medians, and the "
        "median of the per-round ratios. Random-weight models of the real shapes (their text is noise) on "
        "windows of the benchmark text; the trained T5 of `reference_models.py` on its task's held-out prompts.",
        "",
        "On CTranslate2 these requests are decoded by PocketLM's sampler: CTranslate2 decodes greedily and hands "
        "every step's logits to a callback; while the sampler picks CTranslate2's token decoding goes on, "
        "elsewhere that sequence is decoded again from its prefix (`agreed`: tokens that were CTranslate2's "
        "guess; `restarts`: per token). `no restart`: every step's logits through the sampler in one call, its "
        "choices ignored — what the request would cost if CTranslate2 let a Python logits hook choose (it has "
        "none), against the request without the option.",
        "",
    ]
    if result["mode"] == "quick":
        out += ["> **Quick mode**: two rounds; for checking the script, not for quoting.", ""]
    body = []
    for model, entry in result["models"].items():
        if "rows" not in entry:
            body.append([model, entry["label"], f"unavailable: {entry.get('error', '?')}", *[""] * 7])
            continue
        for x in entry["rows"]:
            status = "" if x.get("met") is None else ("**met**" if x["met"] else "**not met**")
            body.append(
                [
                    model,
                    entry["label"],
                    x["row"],
                    f"{x['base_s']:.2f} s",
                    f"{x['option_s']:.2f} s",
                    f"{_x(x['ratio'])} {status}".strip(),
                    "–" if "agreed" not in x else f"{x['agreed']:.0%}",
                    "–" if "restarts_per_token" not in x else f"{x['restarts_per_token']:.2f}",
                    _x(x.get("no_restart_ratio")),
                    ", ".join(f"{v:.2f}" for v in x["ratios"]),
                ]
            )
    header = ["model", "engine", "row", "without", "with", "ratio (target <= 3x)", "agreed", "restarts/token"]
    out += harness_table(header + ["no restart", "per-round ratios"], body) + [""]
    restart_rows = []
    for model, entry in result["models"].items():
        rc = entry.get("restart")
        if not rc:
            continue
        restart_rows.append(
            [
                model,
                _ms(rc["step_s"]),
                _ms(rc["encoder_and_step_s"]),
                *[f"{_ms(v)} ({rc['restart_steps'][k]:.0f} steps)" for k, v in rc["restart_s"].items()],
                f"{_ms(next(iter(rc['batched_restart_s'].values())))}, logits off by {rc['batched_logits_error']:.1e}",
            ]
        )
    if restart_rows:
        lengths = list(next(e["restart"] for e in result["models"].values() if e.get("restart"))["restart_s"])
        out += [
            "What a restart costs on CTranslate2 (called directly, medians): one decoding step; the encoder and "
            "one step; a restart from a prefix of L tokens (CTranslate2 decodes a target prefix one position at a "
            "time, then one new token); and the same prefix in one batched pass (`return_alternatives`, its only "
            "batched prefix), which would be cheaper but whose logits are off (relative to the one-at-a-time "
            "logits, which match transformers): not usable for exact results.",
            "",
        ]
        out += harness_table(
            ["model", "step", "encoder + step", *[f"restart, L={k}" for k in lengths], "batched prefix, L=63"],
            restart_rows,
        )
        out.append("")
    for model, date in result.get("kept", {}).items():
        out += [f"{model}: kept from an earlier run ({date}, `--keep-others`).", ""]
    missing = [m for m in MODELS if m not in result["models"]]
    if missing:
        out += [f"Not in this run: {', '.join(missing)} (`--models`; the trained T5 needs `--trained` once).", ""]
    loads = [e["machine_load"] for e in result["models"].values() if e.get("machine_load")]
    if loads:
        out += [
            "Machine meanwhile: other processes used at most "
            f"{max((x['other_cpu_share'] or 0) for x in loads):.0%} of the CPUs, load average at most "
            f"{max(max(x['load_before'], x['load_after']) for x in loads):.2f}.",
            "",
        ]
    return out


def harness_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_section(lines: list[str]) -> None:
    """Put the section into benchmarks/README.md: in place of its previous version, else before
    "## Method". (report.py regenerates the rest of the file from results/*.json.)"""
    text = README.read_text().splitlines() if README.is_file() else []
    if SECTION in text:
        start = text.index(SECTION)
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    else:
        start = end = next((i for i, line in enumerate(text) if line.startswith("## Method")), len(text))
    text[start:end] = lines
    README.write_text("\n".join(text).rstrip() + "\n")
    print(f"wrote {README} ({SECTION})", flush=True)


if __name__ == "__main__":
    if harness.child_main(JOBS):
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
