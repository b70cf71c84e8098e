"""Per-step control (issue 27): what steering every token costs, against the same request
without the option, measured in the same process, interleaved.

Rows (ROWS) are a request option and the request it is compared with: seeded sampling against
the same sampling unseeded, presence/frequency penalties and logit_bias against plain greedy,
and structured output (a 4-label `choice`, a `regex`, a `json_schema`) against plain greedy.
Each row says which engines it applies to; every model (MODELS) runs the rows of its engine.
A row's option may be made for the model (`prepare`: labels its vocabulary can write, the ids
logit_bias moves).

A constrained answer ends as soon as its constraint is complete, so it may be shorter than the
N tokens the other rows produce: constraint rows are compared per generated token, against the
request without the option run to exactly as many tokens as the constrained answer had on that
prompt (known from an untimed run of the constrained request just before the pair). After the
timed rounds, the mask's own cost: the last round's constrained tokens replayed through a fresh
`Guide` of the same constraint, timing `fill()` + `apply(row)` (a float32 row of the model's
vocabulary size) per token.

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
(`min_new_tokens = max_new_tokens = N`; constraint rows: see above). Times are medians over
rounds; the ratio is the median of the per-round ratios of time per generated token.
Random-weight models of the real shapes (common.py; their stand-in T5 vocabulary writes only
"w0", "w1", ...) and, with --trained (or when they are already built), the trained BLOOM and T5
of reference_models.py (the BLOOM on held-out text, the T5 on its task's prompts).

    .venv/bin/python benchmarks/control_bench.py --quick        # minutes, noisy
    .venv/bin/python benchmarks/control_bench.py                # full
    .venv/bin/python benchmarks/control_bench.py --models flan-t5-small bloomz-560m --trained
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
TARGET_CT2 = 3.0  # seeded sampling, penalties, logit_bias on CTranslate2: at most 3x the request without
# a constraint, per generated token: at most this many times the request without, on trained models
# (random-weight shapes, which rarely pick what the constraint allows, are reported as the worst case)
TARGET_CONSTRAINT = {"llama.cpp": 1.3, "ctranslate2": 1.5}
BOTH = ("llama.cpp", "ctranslate2")


@dataclass(frozen=True)
class Settings:
    quick: bool
    prompt_tokens: int
    new_tokens: int
    warmup_new_tokens: int
    rounds: int
    restart_repeats: int
    child_timeout_s: int
    # a timed request is repeated until it has taken this long (then both of a pair run as many
    # times): a fast model's request takes a few milliseconds, too short to time once
    min_timed_s: float = 0.2

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
    option: dict[str, Any]  # what the row adds (or what `prepare` makes of it for a model)
    engines: tuple[str, ...] = ("ctranslate2",)  # the backends it applies to
    target: float | dict[str, float] | None = TARGET_CT2  # at most this many times the request without
    no_restart: bool = False  # also measure CTranslate2 with a logits hook's cost (see the docstring)
    prepare: Callable[[Any, list[int], Settings], dict[str, Any]] | None = None  # (model, a prompt, settings)
    constraint: bool = False  # ends when complete: compared per token, with the mask timed (docstring)
    per_prompt: bool = False  # `prepare` makes the option for each prompt (logit_bias: the ids greedy writes there)

    def target_on(self, backend: str) -> float | None:
        return self.target.get(backend) if isinstance(self.target, dict) else self.target

    def options(self, n: int, with_option: bool, option: dict[str, Any] | None = None) -> dict[str, Any]:
        added = (self.option if option is None else option) if with_option else {}
        return {"max_new_tokens": n, "min_new_tokens": n, **self.base, **added}


LABELS = ["positive", "negative", "neutral", "mixed"]
# lowercase words (letters and digits: the stand-in T5 vocabularies write only w0, w1, ...) and
# single spaces, unbounded: the answer goes on to the end token or the N tokens
REGEX = r"[a-z0-9]+( [a-z0-9]+)*"
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": LABELS},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "summary": {"type": "string", "maxLength": 32},
    },
    "required": ["label", "score", "summary"],
    "additionalProperties": False,
}
BIAS = 5.0  # logit_bias: -BIAS on the two tokens greedy writes most, +BIAS on two it never writes


def _text_ids(model: Any) -> list[int]:
    """Ids of ordinary text tokens (not special, padding or end), as constraints see them."""
    vocab = model.engine.vocabulary()
    ends = set(model.engine.end_ids())
    return [i for i, t in enumerate(vocab.tokens) if t and i not in ends]


def prepare_choice(model: Any, ids: list[int], s: Settings) -> dict[str, Any]:
    """LABELS if the vocabulary can write them (a real or trained one can), else four labels of
    two of its own word pieces each (the stand-in T5 vocabulary writes only "w0", "w1", ...),
    pieces that no shorter piece begins: the runtime's check that a constraint can be written
    follows only the shortest token of each first byte, and refuses "w13" because " w1" leads
    nowhere (see the report of this benchmark's run)."""
    from pocketlm.converters.core.errors import RequestError

    vocab = model.engine.vocabulary()
    try:
        vocab.constraint("choice", tuple(LABELS))
        return {"choice": LABELS}
    except RequestError:
        pass
    pieces = [vocab.tokens[i].decode("utf-8", "ignore").strip() for i in _text_ids(model)]  # type: ignore[union-attr]
    words = sorted({w for w in pieces if w.isalnum()}, key=lambda w: (len(w), w))
    words = [w for i, w in enumerate(words) if not any(w.startswith(shorter) for shorter in words[:i])][1:9]
    return {"choice": [f"{a} {b}" for a, b in zip(words[::2], words[1::2])]}


def prepare_bias(model: Any, ids: list[int], s: Settings) -> dict[str, Any]:
    """-BIAS on the two tokens greedy writes most on this prompt, +BIAS on two text tokens it does
    not write: the output changes, and stays N tokens long (min_new_tokens)."""
    from collections import Counter

    written = model.generate(ids, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens).token_ids
    down = [t for t, _ in Counter(written).most_common(2)]
    text = _text_ids(model)
    up = [t for t in text[len(text) // 3 :: max(len(text) // 7, 1)] if t not in written][:2]
    return {"logit_bias": {**{t: -BIAS for t in down}, **{t: BIAS for t in up}}}


ROWS: list[Row] = [
    Row("seeded sampling (temperature 1)", {"temperature": 1.0}, {"seed": 1}, no_restart=True),
    Row("seeded sampling (temperature 0.7, top_p 0.9)", {"temperature": 0.7, "top_p": 0.9}, {"seed": 1}),
    Row("presence_penalty 0.5 (greedy)", {}, {"presence_penalty": 0.5}, no_restart=True),
    Row("frequency_penalty 0.5 (greedy)", {}, {"frequency_penalty": 0.5}),
    Row(
        f"logit_bias ±{BIAS:g} on 4 ids (greedy)",
        {},
        {},
        BOTH,
        {"ctranslate2": TARGET_CT2},
        no_restart=True,
        prepare=prepare_bias,
        per_prompt=True,
    ),
    Row("choice of 4 labels (greedy)", {}, {}, BOTH, TARGET_CONSTRAINT, prepare=prepare_choice, constraint=True),
    Row("regex of lowercase words (greedy)", {}, {"regex": REGEX}, BOTH, TARGET_CONSTRAINT, constraint=True),
    Row(
        "json_schema: enum, bounded integer, string maxLength 32 (greedy)",
        {},
        {"json_schema": SCHEMA},
        ("llama.cpp",),  # T5 vocabularies have no braces
        TARGET_CONSTRAINT,
        constraint=True,
    ),
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
    "bloomz-560m": ModelSpec("GGUF q4_k_m", "gguf", "q4_k_m", "llama.cpp"),
    "flan-t5-small": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2"),
    "mt0-large": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2"),
    "trained-bloom": ModelSpec("GGUF q4_k_m", "gguf", "q4_k_m", "llama.cpp", trained=True, prompts="heldout"),
    "trained-t5": ModelSpec("CT2 int8", "ct2", "int8", "ctranslate2", trained=True, prompts="task"),
}
QUICK_MODELS = ("flan-t5-small", "bloomz-560m")


# -- child jobs -------------------------------------------------------------------------------


def _prompts(model: Any, spec: dict[str, Any], s: Settings, count: int) -> list[list[int]]:
    """`count` prompts: windows of the benchmark text (random-weight models: any ids are
    noise to them), of the held-out text the trained BLOOM never saw, or the trained T5's own
    task ("sort: q d m a"), tokenized by the model. T5 inputs end with the end token."""
    from harness import prompt, text_ids

    if spec["prompts"] == "task":
        from reference_models import task_items

        return [model.tokenize(source) for source, _ in task_items("heldout")[:count]]
    seq2seq = model.info.architecture != "bloom"
    eos = model.engine.end_ids()[0] if seq2seq else None
    if spec["prompts"] == "heldout":
        from reference_models import heldout_text

        ids = model.tokenize(heldout_text())
    else:
        ids = text_ids()
    return [prompt(ids, s.prompt_tokens, 1 + i, eos) for i in range(count)]


def _counts(model: Any) -> dict[str, int]:
    return dict(getattr(model.engine, "stepwise_counts", {}) or {})


def _timed(model: Any, ids: list[int], options: dict[str, Any], repeats: int | None, min_s: float) -> dict[str, Any]:
    """One request's time: the mean of `repeats` runs (None: as many as take `min_s`)."""
    before = _counts(model)
    done, started = 0, time.perf_counter()
    while True:
        r = model.generate(ids, **options)
        done += 1
        elapsed = time.perf_counter() - started
        if (repeats is None and elapsed >= min_s) or done == repeats:
            break
    after = _counts(model)
    out: dict[str, Any] = {
        "seconds": elapsed / done,
        "repeats": done,
        "new_tokens": len(r.token_ids),
        "tokens": list(r.token_ids),
    }
    if after:
        out["stepwise"] = {k: (after.get(k, 0) - before.get(k, 0)) / done for k in after}
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


def _mask_times(model: Any, options: dict[str, Any], tokens: list[int], repeats: int) -> dict[str, Any]:
    """The mask's cost per token: `tokens` (a constrained answer) replayed through a fresh Guide of
    the same constraint, timing fill() + apply(row) on a float32 row of the vocabulary's size
    before each token (the end token's step included); the median over `repeats` replays."""
    import numpy as np

    from pocketlm.core.constraints import constraint_of
    from pocketlm.core.generation import GenerationOptions

    kind, value = constraint_of(GenerationOptions(**options))  # type: ignore[misc]
    constraint = model.engine.vocabulary().constraint(kind, value)
    row = np.random.default_rng(0).standard_normal(model.info.vocab_size).astype(np.float32)
    per_replay, fill_only, created = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        guide = constraint.guide()  # what every constrained request pays once
        created.append(time.perf_counter() - started)
        total = filled = 0.0
        steps = 0
        for token in tokens:
            started = time.perf_counter()
            guide.fill()
            middle = time.perf_counter()
            guide.apply(row)
            total += time.perf_counter() - started
            filled += middle - started
            steps += 1
            if model.engine.is_end(token):
                break
            guide.advance(token)
            if guide.stopped:
                break
        per_replay.append(total / max(steps, 1))
        fill_only.append(filled / max(steps, 1))
    return {
        "steps": steps,
        "ms_per_token": statistics.median(per_replay) * 1000,
        "fill_ms_per_token": statistics.median(fill_only) * 1000,
        "guide_ms": statistics.median(created) * 1000,
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
    options: dict[str, dict[str, Any]] = {}
    setup: dict[str, dict[str, float]] = {}
    if any(r.constraint or r.prepare for r in rows):
        started = time.perf_counter()
        model.engine.vocabulary()
        out["vocabulary_s"] = time.perf_counter() - started  # once per model, on its first constrained request
    made: dict[tuple[str, int], dict[str, Any]] = {}

    def option_of(row: Row, i: int) -> dict[str, Any]:
        """The row's option for prompt i (made for this model, or for this prompt: untimed)."""
        key = (row.name, i if row.per_prompt else -1)
        if key not in made:
            made[key] = row.prepare(model, prompts[i], s) if row.prepare else row.option
        return made[key]

    for row in rows:  # the option made for this model, then the warm-up
        options[row.name] = option_of(row, len(prompts) - 1)
        if row.constraint:
            from pocketlm.core.constraints import Constraint, constraint_of
            from pocketlm.core.generation import GenerationOptions

            kind, value = constraint_of(GenerationOptions(**options[row.name]))  # type: ignore[misc]
            started = time.perf_counter()
            Constraint(model.engine.vocabulary(), kind, value)  # compiled afresh (the model caches its own)
            setup[row.name] = {"compile_s": time.perf_counter() - started}  # once, then cached
        for with_option in (False, True):
            model.generate(prompts[-1], **row.options(s.warmup_new_tokens, with_option, options[row.name]))
    results: dict[str, dict[str, list[Any]]] = {r.name: {"base": [], "option": [], "no_restart": []} for r in rows}
    for r in range(s.rounds):
        flip = r % 2 == 1
        for row in reversed(rows) if flip else rows:
            option = option_of(row, r)
            base_n = n
            if row.constraint:  # the answer's length on this prompt: the request without runs as long
                base_n = max(len(model.generate(prompts[r], **row.options(n, True, option)).token_ids), 1)
            pair = (True, False) if flip else (False, True)
            repeats = None  # the first of the pair finds how many runs take min_timed_s
            for with_option in pair:
                run = _timed(
                    model,
                    prompts[r],
                    row.options(n, True, option) if with_option else row.options(base_n, False),
                    repeats,
                    s.min_timed_s,
                )
                repeats = run["repeats"]
                results[row.name]["option" if with_option else "base"].append(run)
            if row.no_restart and info.backend == "ctranslate2":
                results[row.name]["no_restart"].append(_no_restart(model, prompts[r], row.options(n, True, option)))
    for row in rows:  # the mask's own cost, on the last round's answer
        runs = results[row.name]
        runs["changed"] = [b["tokens"] != o["tokens"] for b, o in zip(runs["base"], runs["option"])]
        if row.constraint:
            last = runs["option"][-1]["tokens"]
            setup[row.name] |= _mask_times(model, row.options(n, True, options[row.name]), last, s.restart_repeats)
            setup[row.name]["last_text"] = model.detokenize(last)[:200]
        for run in runs["base"] + runs["option"]:
            del run["tokens"]
    out["rows"] = results
    out["options"] = options  # the warm-up prompt's (logit_bias: each round has its own, made the same way)
    out["setup"] = setup
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


def summarize(row: Row, runs: dict[str, list[Any]], n: int, backend: str, trained: bool, r: dict[str, Any]) -> dict:
    """One row's figures from the child's runs (`r`: the child's whole result)."""
    base, option = runs["base"], runs["option"]
    per_token = [
        (o["seconds"] / max(o["new_tokens"], 1)) / (b["seconds"] / max(b["new_tokens"], 1))
        for b, o in zip(base, option)
    ]
    target = row.target_on(backend)
    out: dict[str, Any] = {
        "row": row.name,
        "base_options": row.base,
        "option": r.get("options", {}).get(row.name, row.option),
        "constraint": row.constraint,
        "base_s": median(x["seconds"] for x in base),
        "option_s": median(x["seconds"] for x in option),
        "base_tokens": [x["new_tokens"] for x in base],
        "option_tokens": [x["new_tokens"] for x in option],
        "base_ms_per_token": median(1000 * x["seconds"] / max(x["new_tokens"], 1) for x in base),
        "option_ms_per_token": median(1000 * x["seconds"] / max(x["new_tokens"], 1) for x in option),
        "ratio": median(per_token),  # of time per generated token (the same as of time at equal lengths)
        "ratios": [round(x, 3) for x in per_token],
        "all_full_length": all(x["new_tokens"] == n for x in base + option),
        "same_length": all(b["new_tokens"] == o["new_tokens"] for b, o in zip(base, option)),
        "output_changed": runs.get("changed"),
        "target": target,
        # constraint targets bind on trained models; on random shapes they are the worst case
        "binding": target is not None and (trained or not row.constraint),
    }
    if row.name in r.get("setup", {}):
        out |= r["setup"][row.name]
    steps = [x["stepwise"] for x in option if x.get("stepwise")]
    tokens = sum(x.get("tokens", 0) for x in steps)
    if tokens:
        calls = sum(x.get("calls", 0) for x in steps)
        out["agreed"] = sum(x.get("agreed", 0) for x in steps) / tokens
        out["restarts_per_token"] = (calls - len(steps)) / tokens
        out["calls_per_request"] = calls / len(steps)
    if runs["no_restart"]:
        out["no_restart_s"] = median(runs["no_restart"])
        out["no_restart_ratio"] = median(x / b["seconds"] for x, b in zip(runs["no_restart"], base))
    out["met"] = out["ratio"] <= target if target is not None and out["ratio"] is not None else None
    return out


def ensure_trained(model: str, build: bool) -> bool:
    """Whether a trained reference model is there (built now when `build`: about 12 min on 2 cores)."""
    from reference_models import TRAINED

    if (TRAINED / model / "training.json").is_file():
        return True
    if not build:
        return False
    import subprocess

    print(f"  training {model} (reference_models.py, about 12 min)", flush=True)
    only = model.removeprefix("trained-")
    subprocess.run([sys.executable, str(SCRIPT.parent / "reference_models.py"), "--only", only], check=True)
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, flan-t5-small only (noisy)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all (--quick: flan-t5-small)")
    parser.add_argument("--trained", action="store_true", help="train the reference models if not built yet")
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
            if spec.trained and not ensure_trained(model, args.trained or model in (args.models or [])):
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
            "vocabulary_s": r.get("vocabulary_s"),
            "peak_rss_mib": child.peak_rss / harness.MIB,
            "machine_load": load,
            "rows": [summarize(row, r["rows"][row.name], s.new_tokens, spec.backend, spec.trained, r) for row in rows],
            "restart": r.get("restart"),
        }
        for x in entry["rows"]:
            extra = ""
            if x["constraint"]:
                extra += (
                    f"; tokens {'/'.join(map(str, x['option_tokens']))}, mask {x['ms_per_token']:.3f} ms/token "
                    f"(fill {x['fill_ms_per_token']:.3f}), compile {x['compile_s'] * 1000:.0f} ms"
                )
            if x["output_changed"] and not x["constraint"] and not all(x["output_changed"]):
                extra += f"; output changed in {sum(x['output_changed'])}/{len(x['output_changed'])} rounds"
            if "agreed" in x:
                extra += f"; agreed {x['agreed']:.0%}, {x['restarts_per_token']:.2f} restarts/token"
            if "no_restart_ratio" in x:
                extra += f"; no restart {x['no_restart_ratio']:.2f}x"
            print(
                f"  {model} {x['row']}: {x['base_ms_per_token']:.1f} -> {x['option_ms_per_token']:.1f} ms/token "
                f"= {x['ratio']:.2f}x "
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
        worst = "" if t["binding"] else ", random weights: worst case, the target is for trained models"
        print(f"  {t['name']}: {t['value']:.2f}x ({'met' if t['met'] else 'NOT met'}, target {t['target']}{worst})")
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
                        "binding": x.get("binding", True),  # False: a random shape's constraint row (worst case)
                    }
                )
    return out


# -- the README section -------------------------------------------------------------------------


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f} ms"


def _short(name: str) -> str:
    return name.split(" ")[0].removesuffix(":")


def _clip(text: str, width: int = 60) -> str:
    text = text.replace("`", "'").replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _row_name(x: dict[str, Any]) -> str:
    """The row, with the labels a choice row used when they are not the usual ones."""
    option = x.get("option") or {}
    if "choice" in option and option["choice"] != LABELS:
        return f"{x['row']}: {', '.join(option['choice'])}"
    changed = x.get("output_changed")
    if "logit_bias" in option and changed:
        return f"{x['row']}, changed {sum(changed)}/{len(changed)}"
    return x["row"]


def _tokens(x: dict[str, Any], n: int) -> str:
    got = x.get("option_tokens")
    if not got or not x.get("constraint"):
        return str(n)
    return "/".join(map(str, got))


def _per_token(x: dict[str, Any], side: str) -> str:
    ms = x.get(f"{side}_ms_per_token")
    if ms is None:  # an earlier run's row: times of N tokens
        return f"{x[f'{side}_s']:.2f} s"
    return f"{ms:.2f} ms" if ms < 1 else f"{ms:.1f} ms"


def _added(x: dict[str, Any]) -> str:
    """What the option adds to each generated token (medians' difference)."""
    if x.get("option_ms_per_token") is None:
        return "–"
    return f"{x['option_ms_per_token'] - x['base_ms_per_token']:+.2f} ms"


def _status(x: dict[str, Any]) -> str:
    if x.get("target") is None:
        return "reported"
    target = f"<= {x['target']:g}x"
    if x.get("binding", True):
        return f"{target} **{'met' if x['met'] else 'not met'}**"
    return f"{target}: worst case {'within' if x['met'] else 'above'}"


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
        f"round), exactly {st['new_tokens']} new tokens (`min_new_tokens = max_new_tokens`), greedy unless the "
        "row says; medians, and the median of the per-round ratios of time per generated token. "
        "Random-weight models of the real shapes (their text is noise; their stand-in T5 vocabulary writes only "
        "`w0`, `w1`, ...) on windows of the benchmark text; the trained BLOOM of `reference_models.py` on "
        "held-out text, the trained T5 on its task's held-out prompts.",
        "",
        "Rows are compared by time per generated token, each against the same request without its option on "
        "the same prompt: a constrained answer ends as soon as its constraint is complete (a label: a few tokens), "
        "so the request without a constraint is run to exactly as many tokens as the constrained answer "
        "had on that prompt (from an untimed constrained run just before the pair; `tokens`: the constrained "
        "answers' lengths, round by round). `mask`: the last round's constrained answer replayed through a "
        "fresh `Guide` of the same constraint, `fill()` + `apply(row)` per token on a float32 row of the "
        "vocabulary's size (llguidance's `fill()` alone in brackets), and `new Guide`: making one, which "
        "every constrained request does once; `added per token`: the difference of the medians; compiling "
        "a constraint is paid once per "
        "model and constraint (cached), building the vocabulary once per model (both before the timed runs). "
        "Constraint targets (<= 1.3x on llama.cpp, <= 1.5x on CTranslate2) are for trained models, which "
        "mostly write what a constraint allows, as real models do; random weights rarely do, so their rows are "
        "the worst case (`worst case: within` / `above`). logit_bias: -5 on the two tokens greedy writes most "
        "on the round's prompt, +5 on two it does not write (ids chosen by an untimed greedy run); `changed`: "
        "rounds whose output differs from greedy's.",
        "",
        "On CTranslate2 these requests are decoded by PocketLM's sampler: CTranslate2 decodes greedily and hands "
        "every step's logits to a callback; while the sampler picks CTranslate2's token decoding goes on, "
        "elsewhere that sequence is decoded again from its prefix (`agreed`: tokens that were CTranslate2's "
        "guess; `restarts`: per token; tokens a constraint forces are appended without a model call). "
        "`no restart`: every step's logits through the sampler in one call, its "
        "choices ignored — what the request would cost if CTranslate2 let a Python logits hook choose (it has "
        "none), against the request without the option.",
        "",
    ]
    if result["mode"] == "quick":
        out += ["> **Quick mode**: two rounds; for checking the script, not for quoting.", ""]
    body = []
    for model, entry in result["models"].items():
        if "rows" not in entry:
            body.append([model, entry["label"], f"unavailable: {entry.get('error', '?')}", *[""] * 12])
            continue
        for x in entry["rows"]:
            body.append(
                [
                    model,
                    entry["label"],
                    _row_name(x),
                    _tokens(x, st["new_tokens"]),
                    _per_token(x, "base"),
                    _per_token(x, "option"),
                    _x(x["ratio"]),
                    _status(x),
                    "–" if "agreed" not in x else f"{x['agreed']:.0%}",
                    "–" if "restarts_per_token" not in x else f"{x['restarts_per_token']:.2f}",
                    _added(x),
                    "–" if "ms_per_token" not in x else f"{x['ms_per_token']:.2f} ms ({x['fill_ms_per_token']:.2f})",
                    "–" if "guide_ms" not in x else f"{x['guide_ms']:.2f} ms",
                    _x(x.get("no_restart_ratio")),
                    ", ".join(f"{v:.2f}" for v in x["ratios"]),
                ]
            )
    header = ["model", "engine", "row", "tokens", "without, per token", "with, per token", "ratio", "target"]
    header += ["agreed", "restarts/token", "added per token", "mask/token (fill)", "new Guide", "no restart"]
    header += ["per-round ratios"]
    out += harness_table(header, body) + [""]
    setup = []
    for model, entry in result["models"].items():
        rows = [x for x in entry.get("rows", []) if x.get("constraint")]
        if rows:
            compiled = ", ".join(f"{_short(x['row'])} {x['compile_s'] * 1000:,.0f} ms" for x in rows)
            setup.append(f"{model}: vocabulary {entry['vocabulary_s']:.2f} s; compiling {compiled}.")
    if setup:
        out += ["Paid once before the timed runs: " + " ".join(setup), ""]
        examples = []
        for model, entry in result["models"].items():
            for x in entry.get("rows", []):
                if x.get("constraint") and x.get("last_text") is not None:
                    examples.append(f"{model}, {_short(x['row'])}: `{_clip(x['last_text'])}`")
        out += ["Last constrained answers (the text as returned): " + "; ".join(examples) + ".", ""]
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
        out += [
            f"Not in this run: {', '.join(missing)} (`--models`; the trained models need `--trained` once).",
            "",
        ]
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
