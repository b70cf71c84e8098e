"""Regenerate benchmarks/README.md from benchmarks/results/*.json (speed, fidelity, serve, beams, ray, convert).

    .venv/bin/python benchmarks/report.py

Run by speed_bench.py and fidelity_bench.py when they finish; every number in the README
comes from the JSON files, none is typed by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
MIB = 2**20


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def num(x: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table cell: fixed digits, thousands separated; blank when missing."""
    if x is None:
        return "–"
    return f"{x:,.{digits}f}{suffix}"


def sig(x: float | None, digits: int = 2) -> str:
    """Significant digits, for values spanning decades (KL)."""
    return "–" if x is None else f"{x:.{digits}g}"


def pct(x: float | None, signed: bool = True) -> str:
    return "–" if x is None else (f"{x:+.1%}" if signed else f"{x:.1%}")


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# -- sections -------------------------------------------------------------------------------


def headline(speed: dict[str, Any] | None, fidelity: dict[str, Any] | None) -> list[str]:
    out = ["## Targets (issue 7)", ""]
    if not speed:
        return out + ["Speed not measured yet: `make bench`.", ""]
    status = {True: "**met**", False: "**not met**", None: "not measured"}
    rows = []
    for t in speed["targets"]:
        value = t["value"]
        shown = (
            pct(value) if "overhead" in t["name"] else num(value, 3, " s") if "import" in t["name"] else times(value)
        )
        rows.append([t["name"], t["target"], shown, status[t["met"]], t["detail"]])
    return out + table(["target", "goal", "measured", "status", "numbers"], rows) + [""]


def machine(speed: dict[str, Any] | None, fidelity: dict[str, Any] | None) -> list[str]:
    src = speed or fidelity
    if not src:
        return []
    m, d = src["machine"], src.get("machine_details", {})
    lines = [
        "## Machine",
        "",
        f"- {d.get('cpu') or 'unknown CPU'}: {m['cpus']} CPUs ({d.get('usable_cpus', '?')} usable), "
        f"{d.get('ram_gib', '?')} GiB RAM; {m['system']}; Python {m['python']}",
    ]
    if speed:
        bw = speed["bandwidth"]
        lines.append(
            f"- Memory read bandwidth (numpy sum and max over 1 GiB, best of 5): {bw['gbps_1_thread']:.1f} GB/s with "
            "1 thread, "
            f"{bw.get('gbps_2_threads', 0):.1f} GB/s with 2; the roofline uses the better, {bw['best_gbps']:.1f} GB/s"
        )
        lines.append(
            f"- Every engine runs with {speed['threads']} threads. Speed measured {speed.get('date', '?')} "
            f"in {speed['mode']} mode ({speed['wall_s'] / 60:.0f} min)"
        )
        for model, date in speed.get("kept", {}).items():
            lines.append(f"- {model}: speed results kept from an earlier run ({date}, `--keep-others`)")
    if fidelity:
        took = f", {fidelity['wall_s'] / 60:.0f} min" if "wall_s" in fidelity else ""
        lines.append(
            f"- Fidelity measured {fidelity.get('date', '?')} in {fidelity['mode']} mode "
            f"({fidelity['positions']} scored positions per model{took})"
        )
    return lines + [""]


def reproduce(speed: dict[str, Any] | None, fidelity: dict[str, Any] | None) -> list[str]:
    lines = [
        "## Reproduce",
        "",
        "```sh",
        "make bench       # .venv/bin/python benchmarks/speed_bench.py    (then this README)",
        "make fidelity    # .venv/bin/python benchmarks/fidelity_bench.py (needs matplotlib for the plot)",
        ".venv/bin/python benchmarks/convert_bench.py     # conversion time and memory",
        ".venv/bin/python benchmarks/scale_bench.py       # conversion at bloomz-7b1/T0pp scale (~1 h, ~52 GiB disk)",
        ".venv/bin/python benchmarks/serve_bench.py       # many callers at once (--quick: minutes)",
        ".venv/bin/python benchmarks/llama_tools.py       # llama.cpp's llama-server etc. (serve_bench builds it: "
        "once, about 10 min)",
        ".venv/bin/python benchmarks/beam_bench.py        # beam search vs transformers, vs greedy (--quick: minutes)",
        ".venv/bin/python benchmarks/speed_bench.py --quick --models flan-t5-small   # a few minutes, noisy",
        ".venv/bin/python benchmarks/speed_bench.py --targets-only   # re-judge the last run's figures, measuring "
        "nothing",
        ".venv/bin/python benchmarks/report.py            # this file, from benchmarks/results/*.json",
        "```",
        "",
        "Checkpoints (random weights, published shapes) and converted models are cached in "
        "`benchmarks/results/cache/` (about 25 GB when everything is built; `--rebuild` converts again after "
        "converter changes). The full runs' durations on this machine are in Machine above (conversions excluded: "
        "about 10 min more the first time); quick modes take a few minutes each. "
        "Run on an otherwise idle machine: shared cores slow the engines' spinning worker threads (OpenMP in torch, "
        "llama.cpp's threadpool) by up to 100x, far more than the share of CPU they lose. A child process that runs "
        "longer than the mode's limit is stopped and its variant reported as timed out.",
    ]
    for name, res in (("speed", speed), ("fidelity", fidelity)):
        if res:
            lines.append(f"Last {name} run: `{res['command'].strip()}`.")
    return lines + [""]


def quick_banner(speed: dict[str, Any] | None, fidelity: dict[str, Any] | None) -> list[str]:
    quick = [n for n, r in (("speed", speed), ("fidelity", fidelity)) if r and r["mode"] == "quick"]
    if not quick:
        return []
    return [
        f"> **Quick mode ({', '.join(quick)})**: one process, one short run per variant, on a possibly busy "
        "machine. These numbers are for checking the scripts, not for quoting: run `make bench` / "
        "`make fidelity` on an idle machine.",
        "",
    ]


def variant_label(r: dict[str, Any]) -> str:
    """The variant, with what actually ran when the runtime chose it."""
    label = r["variant"]["label"]
    info = r.get("info")
    if r["variant"]["format"] == "hf" and info:
        return (
            label
            + f": {info['format']} {info['quant']}"
            + (f", compute {r['compute_type']}" if r.get("compute_type") else "")
        )
    if r.get("compute_type") and r["variant"]["compute_type"] != r["compute_type"]:
        return label + f" (runs as {r['compute_type']})"
    return label


def speed_tables(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return []
    s = speed["settings"]
    out = [
        "## Speed and memory",
        "",
        f"Batch 1: a {s['prompt_tokens']}-token prompt, then exactly {s['new_tokens']} new tokens (greedy, end of "
        "sequence "
        f"masked); median of {s['processes']} fresh process(es) x {s['runs']} run(s) after one warm-up generation per "
        "process. Load time and peak RSS: median over the processes. `x tf` columns: ratio to transformers fp32 "
        "measured "
        "in the same run, taking for each figure the better of its two runs (default OpenMP waiting, and "
        "`OMP_WAIT_POLICY=PASSIVE`, which keeps torch fast when cores are shared); decode: higher is better, RSS: "
        "lower "
        "is better. Roofline: decode tok/s x bytes read per "
        "token / measured bandwidth (see Method).",
        "",
    ]
    header = [
        "variant",
        "file MiB",
        "load s",
        "peak RSS MiB",
        "RSS x tf",
        "TTFT s",
        "prompt tok/s",
        "decode tok/s",
        "decode x tf",
        "roofline",
    ]
    for model, rows in speed["models"].items():
        out += [f"### {model}", ""]
        body = []
        for r in rows:
            label = variant_label(r)
            if "error" in r:
                body.append([label, "", "", "", "", "", "", "", "", f"unavailable: {r['error']}"])
                continue
            b, vs = r["batch1"], r.get("vs_baseline", {})
            body.append(
                [
                    label,
                    num(r["file_bytes"] / MIB, 0),
                    num(b["load_s"], 2),
                    num(b["peak_rss_mib"], 0),
                    times(vs.get("peak_rss")),
                    num(b["ttft_s"], 3),
                    num(b["prompt_tps"]),
                    num(b["decode_tps"]),
                    times(vs.get("decode")),
                    pct(r.get("roofline_fraction"), signed=False),
                ]
            )
        out += table(header, body) + [""]
        auto = next(
            (
                r
                for r in rows
                if r["variant"]["format"] == "hf" and r["variant"]["engine"] == "pocketlm" and "info" in r
            ),
            None,
        )
        if auto:
            out += [
                f"`pocketlm.load(checkpoint folder)` (threads={speed['threads']}, nothing else given) on this machine: "
                + "; ".join(auto["info"]["reasons"])
                + ".",
                "",
            ]
    batched = [(m, r) for m, rows in speed["models"].items() for r in rows if "batch" in r or "batch_error" in r]
    if batched:
        out += [
            f"### One batch of {s['batch_prompts']} prompts (T5 family)",
            "",
            f"{s['batch_prompts']} prompts of {s['prompt_tokens'] // 2} to {s['prompt_tokens'] * 3 // 2} tokens, "
            f"{s['batch_new_tokens']} new tokens each, median of {s.get('batch_processes', 1)} process(es) x "
            f"{s.get('batch_runs', s['runs'])} run(s); PocketLM through `model.generate([...])` (CTranslate2: one "
            "`translate_batch`; llama.cpp: one prompt after the other), transformers with padding and an attention "
            "mask.",
            "",
        ]
        body = []
        for model, r in batched:
            if "batch_error" in r:
                body.append([model, variant_label(r), "", "", "", f"unavailable: {r['batch_error']}"])
                continue
            vs = r.get("vs_baseline", {}).get("batch")
            body.append(
                [
                    model,
                    variant_label(r),
                    num(r["batch"]["seconds"], 2),
                    num(r["batch"]["tokens_per_s"]),
                    times(vs),
                    num(r["batch"]["peak_rss_mib"], 0),
                ]
            )
        out += table(["model", "variant", "batch s", "new tok/s", "x tf", "peak RSS MiB"], body) + [""]
    return out


def overhead_table(speed: dict[str, Any] | None) -> list[str]:
    if not speed or not speed.get("overhead"):
        return []
    s = speed["settings"]
    out = [
        "## Runtime overhead",
        "",
        f"PocketLM's `generate` next to the engine called directly with the same settings, in one process, "
        f"alternating (order flipped each round), {s['overhead_runs']} rounds after a warm-up, medians; same prompt "
        f"and {s['new_tokens']} tokens (batch: {s['batch_prompts']} prompts, {s['batch_new_tokens']} tokens). "
        "Positive overhead: PocketLM is slower.",
        "",
    ]
    body = []
    for o in speed["overhead"]:
        if "error" in o:
            body.append([o["model"], "", "", "", "", f"unavailable: {o['error']}"])
            continue
        ours = o["batch1"]["pocketlm"]
        for name, st in o["batch1"].items():
            if name == "pocketlm":
                continue
            body.append(
                [
                    f"{o['model']} ({o['file']}{', ' + o['compute_type'] if o.get('compute_type') else ''})",
                    name,
                    f"{ours['generate_s']:.3f} / {st['generate_s']:.3f}",
                    f"{ours['decode_tps']:.1f} / {st['decode_tps']:.1f}",
                    pct(st["pocketlm_overhead"]),
                    pct(st["pocketlm_decode_overhead"]),
                ]
            )
        if "batch16" in o:
            secs = o["batch16"]["seconds"]
            body.append(
                [
                    o["model"],
                    f"Translator.translate_batch ({s['batch_prompts']} prompts)",
                    f"{secs['pocketlm']:.3f} / {secs['Translator.translate_batch']:.3f}",
                    "",
                    pct(o["batch16"]["pocketlm_overhead"]),
                    "",
                ]
            )
    return (
        out
        + table(
            [
                "model",
                "called directly",
                "generate s (PocketLM / direct)",
                "decode tok/s (PocketLM / direct)",
                "overhead (time)",
                "overhead (decode)",
            ],
            body,
        )
        + [""]
    )


def roofline_table(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return []
    bw = speed["bandwidth"]["best_gbps"]
    out = [
        "## Roofline",
        "",
        f"Decoding one token at batch 1 must stream every weight it multiplies from memory, so decode speed is bounded "
        f"by bandwidth / bytes per token. Measured bandwidth: {bw:.1f} GB/s. Bytes per token (formula in Method) are "
        "at the run's average position.",
        "",
    ]
    body = []
    for model, rows in speed["models"].items():
        for r in rows:
            if "batch1" not in r:
                continue
            bpt = r["batch1"]["bytes_per_token"]
            achieved = r["batch1"]["decode_tps"] * bpt["total"] / 1e9
            body.append(
                [
                    model,
                    variant_label(r),
                    num(bpt["weights"] / MIB),
                    num(bpt["cache"] / MIB, 2),
                    num(bw * 1e9 / bpt["total"]),
                    num(r["batch1"]["decode_tps"]),
                    num(achieved, 2),
                    pct(r.get("roofline_fraction"), signed=False),
                ]
            )
    return (
        out
        + table(
            [
                "model",
                "variant",
                "weights MiB/token",
                "cache MiB/token",
                "bound tok/s",
                "decode tok/s",
                "achieved GB/s",
                "of bandwidth",
            ],
            body,
        )
        + [""]
    )


def import_section(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return []
    imp = speed["import_runtime"]
    return [
        "## `import pocketlm`",
        "",
        f"{imp['seconds']:.3f} s, median of {len(imp['samples'])} fresh interpreters (bytecode already compiled; "
        f"samples: {', '.join(f'{x:.3f}' for x in imp['samples'])}). Target < 0.3 s.",
        "",
    ]


def overhead_section(res: dict[str, Any] | None) -> list[str]:
    """Issue 26: the decode loop's Python cost per token and the import, before vs after, one run."""
    if not res:
        return []
    b, a, imp, m = res["before"], res["after"], res["import"], res["model"]
    st = res["settings"]
    same_code = b["commit"] == a["commit"] and not a["dirty"]
    out = [
        "## Overhead before vs after (issue 26)",
        "",
        f"From `benchmarks/results/overhead.json` (`{res['command'].strip()}`, {res['mode']} mode, {res['date']}, "
        f"{res['wall_s'] / 60:.0f} min, {res['machine_details'].get('cpu') or 'CPU ?'}, load average "
        f"{res['load_average']['start'][0]:.2f} at the start): before = {b['label']}, after = {a['label']}, "
        "each in its own child processes (PYTHONPATH and cwd its tree; the module files checked), "
        f"alternating, {st['rounds']} processes each. A random BLOOM (hidden {m['hidden']}, {m['n_layer']} layers, "
        f"vocabulary {m['vocab_size']}, {m['quant']}), 1 thread, greedy, a {st['prompt_tokens']}-token prompt: "
        "its engine steps cost little, so the time per token is mostly Python. Per new token = (time of "
        f"{st['new_tokens']} new tokens - time of 1) / the tokens in between, median of {st['repeats']} in each "
        "process, then the median over processes; CPU = the process's CPU time, less disturbed by other "
        f"work on the machine. Import: fresh interpreters, median of {st['import_repeats']} (bytecode compiled; "
        f"a bare interpreter takes {imp['interpreter_ms']:.0f} ms); `-X importtime`: the package's cumulative "
        "time. Below 1x: after is faster. Process pairs: each after process over the before process next to it "
        "(its 25th-75th percentile), the spread between processes; fastest / fastest: the ratio of each side's "
        "fastest process, the least disturbed by other work on a shared machine.",
        "",
    ]
    if same_code:
        out += ["Both sides are the same commit: the ratios show the noise of the measurement.", ""]
    if res["mode"] == "quick":
        out += ["> **Quick mode**: few rounds; for checking the script, not for quoting.", ""]
    rows = []
    for label, r in res["overhead"].items():
        spread = r["paired_ratio_quartiles"]
        rows.append(
            [
                f"`{label}`: µs per new token",
                num(r["before"]["per_token_us"]),
                num(r["after"]["per_token_us"]),
                times(r["ratio"]),
                f"{spread[0]:.2f}x-{spread[1]:.2f}x",
                times(r.get("best_ratio")),
            ]
        )
        rows.append(
            [
                f"`{label}`: CPU µs per new token",
                num(r["before"]["cpu_per_token_us"]),
                num(r["after"]["cpu_per_token_us"]),
                times(r["cpu_ratio"]),
                "",
                "",
            ]
        )
    rows.append(
        [
            f"`{imp['before']['statement']}` / `{imp['after']['statement']}`: ms",
            num(imp["before"]["wall_ms"]),
            num(imp["after"]["wall_ms"]),
            times(imp["ratio"]),
            "",
            "",
        ]
    )
    before_load, after_load = num(imp["before"]["load_wall_ms"]), num(imp["after"]["load_wall_ms"])
    rows.append(["... then `.load`: ms", before_load, after_load, times(imp["load_ratio"]), "", ""])
    if imp.get("importtime_ratio"):
        rows.append(
            [
                "`-X importtime`, the package: ms",
                num(imp["before"]["importtime_ms"]),
                num(imp["after"]["importtime_ms"]),
                times(imp["importtime_ratio"]),
                "",
                "",
            ]
        )
    header = ["measurement", "before", "after", "after / before", "middle half of process pairs", "fastest / fastest"]
    out += table(header, rows)
    same = all(r["same_tokens"] for r in res["overhead"].values())
    return out + ["", f"Same greedy tokens before and after: {'yes' if same else '**no**'}.", ""]


def convert_section(convert: dict[str, Any] | None) -> list[str]:
    out = ["## Conversion", ""]
    if not convert:
        return out + ["Not measured yet: `.venv/bin/python benchmarks/convert_bench.py`.", ""]
    out += [f"From `benchmarks/results/convert.json` (`{convert['command']}`): each conversion in its own process.", ""]
    body = []
    for r in convert["results"]:
        if "error" in r:
            body.append([r["model"], str(r["checkpoint_mib"]), r["tool"], r["quant"], f"failed: {r['error']}", "", ""])
        else:
            body.append(
                [
                    r["model"],
                    str(r["checkpoint_mib"]),
                    r["tool"],
                    r["quant"],
                    str(r["seconds"]),
                    str(r["peak_rss_mib"]),
                    str(r["peak_rss_vs_checkpoint"]),
                ]
            )
    return (
        out
        + table(["model", "checkpoint MiB", "converter", "quant", "time s", "peak RSS MiB", "RSS / checkpoint"], body)
        + [""]
    )


def fidelity_section(fidelity: dict[str, Any] | None) -> list[str]:
    out = ["## Fidelity (issue 17)", ""]
    if not fidelity or "targets" not in fidelity:
        return out + ["Not measured yet: `make fidelity`.", ""]
    out += [
        "On **trained** models (`benchmarks/reference_models.py`: a small BLOOM and a small T5 trained here, on CPU, "
        "on `benchmarks/data/corpus/`, 12 languages written for the project), scored teacher-forced on held-out "
        "paragraphs they never saw, against their float32 conversion (GGUF f32 for BLOOM, CTranslate2 float32 for the "
        "T5), which `transformers fp32 (reference check)` confirms. KL = KL(f32 || variant) per position in "
        "nats: mean, median, 99th percentile and max (as llama.cpp's `llama-perplexity --kl-divergence` reports; a "
        "few positions can carry most of the mean); top-1 = how often both pick the same most likely token; "
        "perplexity change relative to the reference; exact match = the T5's held-out task (sort 5 to 9 letters "
        "alphabetically; letter sets never trained on), greedy. `+ imatrix`: llama.cpp's quantizer guided by an "
        "importance matrix that PocketLM computed with llama.cpp over the training text (`pocketlm quantize "
        "--imatrix`). Bytes per weight = "
        "file size / parameters.",
        "",
    ]
    status = {True: "**met**", False: "**not met**", None: "not measured"}
    rows = [[t["name"], t.get("goal", ""), status[t["met"]], t["detail"]] for t in fidelity["targets"]]
    out += table(["target", "goal", "status", "measured"], rows) + [""]
    if fidelity.get("plot"):
        out += [f"![bytes per weight vs KL](results/{fidelity['plot']})", ""]
    for res in fidelity["results"]:
        out += _fidelity_model(res)
    out += _heads_table(fidelity)
    return out


def _fidelity_model(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"### {res['model']}", "", f"Failed: {res['error']}", ""]
    ref, train = res["reference"], res.get("training", {})
    seq2seq = "exact_match" in ref
    shape = train.get("shape") or train.get("config") or {}
    shape_text = ", ".join(f"{k} {v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape)
    lines = [
        f"### {res['model']}",
        "",
        f"{res.get('parameters', 0) / 1e6:.2f} M parameters ({shape_text}); trained in "
        f"{num(train.get('wall_s', 0) / 60)} min on this machine's 2 cores (seed {train.get('seed', '?')}). "
        f"Reference {ref['label'].removesuffix(' (reference)')}: perplexity {ref['perplexity']:.3g} on "
        f"{res['positions']} held-out positions, next-token entropy {ref['entropy']:.2f} nats of ln V = "
        f"{res['log_vocab']:.2f}"
        + (
            f"; exact match {pct(ref['exact_match'], signed=False)} on {res['task_items']} held-out items"
            if seq2seq
            else ""
        )
        + f". Importance matrix: {res['imatrix'].get('chunks')} chunks of {res['imatrix'].get('chunk_size')} "
        f"training tokens, {res['imatrix'].get('matrices')} matrices"
        + (f", {res['imatrix']['seconds']:.1f} s" if res["imatrix"].get("seconds") else "")
        + (
            f"; a column's mean square over the median column's: {res['imatrix']['column_spread_median']:.1f}x at "
            f"most in the median matrix, {res['imatrix']['column_spread_max']:.1f}x in the most uneven"
            if "column_spread_median" in res["imatrix"]
            else ""
        )
        + ".",
        "",
    ]
    rows = res["rows"]
    twins = {r["quant"]: r for r in rows if r.get("imatrix") and "error" not in r}
    header = ["variant", "bytes/weight", "file MiB", "KL mean", "KL median", "KL p99", "KL max", "top-1", "perplexity"]
    header += ["exact match"] if seq2seq else []
    header += ["+ imatrix: KL mean", "KL change", "top-1"] + (["exact match"] if seq2seq else [])
    body = []
    for r in rows:
        if r.get("imatrix"):
            continue
        if "error" in r:
            body.append([r["label"], f"unavailable: {r['error']}"] + [""] * (len(header) - 2))
            continue
        cells = [
            r["label"],
            num(r.get("bytes_per_weight"), 3),
            num(r["file_bytes"] / MIB, 2),
            sig(r["kl_mean"]),
            sig(r.get("kl_median")),
            sig(r.get("kl_p99")),
            sig(r["kl_max"]),
            pct(r["top1_agreement"], signed=False),
            pct(r["perplexity"] / ref["perplexity"] - 1),
        ]
        cells += [pct(r.get("exact_match"), signed=False)] if seq2seq else []
        twin = twins.get(r["quant"]) if r["format"] == "gguf" and not r.get("output_type") else None
        if twin:
            cells += [sig(twin["kl_mean"]), pct(twin["kl_mean"] / r["kl_mean"] - 1), pct(twin["top1_agreement"], False)]
            cells += [pct(twin.get("exact_match"), signed=False)] if seq2seq else []
        else:
            cells += [""] * (4 if seq2seq else 3)
        body.append(cells)
    return lines + table(header, body) + [""]


def _heads_table(fidelity: dict[str, Any]) -> list[str]:
    heads = fidelity.get("heads")
    if not heads:
        return []
    out = [f"### Output head type (BLOOM {heads.get('quant', '')})", ""]
    if "error" in heads:
        return out + [f"Failed: {heads['error']}", ""]
    bloom = next((r for r in fidelity["results"] if r.get("model") == "trained-bloom" and "error" not in r), None)

    def fidelity_row(head: str) -> dict[str, Any] | None:
        if bloom is None:
            return None
        label = f"gguf {heads['quant']}" if head == heads["default"] else f"gguf {heads['quant']}, {head} head"
        return next((r for r in bloom["rows"] if r["label"] == label and "error" not in r), None)

    out += [
        f"BLOOM ties its output head to the token embedding, and llama.cpp gives it {heads['default']} under "
        f"K-quants; `--output-type` picks another. Speed: the {heads['model']} shape (random weights, 250880 x 1024 "
        f"head), a {heads['prompt_tokens']}-token prompt then {heads['new_tokens']} tokens, all variants loaded in one "
        f"process and timed in {heads['rounds']} interleaved rounds (medians), on {heads.get('cpu') or 'this machine'} "
        "with 2 threads. Fidelity: the trained BLOOM (whose head "
        "is a smaller share of the model than bloomz-560m's), as above.",
        "",
    ]
    body = []
    for r in heads["rows"]:
        f = fidelity_row(r["head"])
        body.append(
            [
                r["head"] + (" (llama.cpp's default)" if r["head"] == heads["default"] else ""),
                num(r["file_bytes"] / MIB),
                num(r["decode_tok_s"]),
                times(r["vs_default"]),
                sig(f["kl_mean"]) if f else "–",
                pct(f["top1_agreement"], signed=False) if f else "–",
            ]
        )
    header = ["head type", f"{heads['model']} file MiB", "decode tok/s", "x default head", "trained-bloom KL", "top-1"]
    return out + table(header, body) + [""]


def serve_section(serve: dict[str, Any] | None) -> list[str]:
    """Issue 15: aggregate tokens/s and latency at 1-16 concurrent clients, batched scoring."""
    if not serve:
        return []
    clients = [str(n) for n in serve["clients"]]
    out = [
        "## Many callers at once (issue 15)",
        "",
        f"From `benchmarks/results/serve.json` (`{serve['command']}`, {serve['mode']} mode, {serve['minutes']} min): "
        f"`pocketlm serve` in its own process, N requests sent at once ({serve['prompt_tokens']}-token prompts, "
        f"{serve['new_tokens']} new tokens, greedy), median of {serve['repeats']} rounds; aggregate = all new tokens / "
        "the round's wall time; p50/p95 over every request of the rounds. `--parallel 1` is the behaviour before "
        "continuous batching.",
        "",
    ]
    llama = serve.get("llama_server")
    if llama:
        out += [
            f"`llama-server -np N`: llama.cpp's own server, built from the llama.cpp source in llama-cpp-python "
            f"{llama['llama_cpp_python']}'s sdist by benchmarks/llama_tools.py (cmake "
            f"`{' '.join(llama.get('cmake_flags') or [])}`, {llama.get('build_minutes')} min), run as "
            f"`{llama['command']}`, N and the KV cache's CELLS those of its twin `pocketlm serve --parallel N` "
            "(as its /health reports them), the weight layout PocketLM's (`--no-repack` exactly where PocketLM turns "
            "llama.cpp's extra buffer types off: repacked q4_K weights made a 512-token prefill 32% slower here); "
            "the twins are up at once and their rounds alternate; the same requests as PocketLM's (both servers "
            "stop at end of sequence, neither is asked to ignore it).",
            "",
        ]
    rows, judged, twins = [], [], []
    for model, variants in serve["models"].items():
        base = variants.get("pocketlm --parallel 1", {})
        for label, r in variants.items():
            if "error" in r or "skipped" in r:
                note = r["error"] if "error" in r else f"skipped: {r['skipped']}"
                rows.append([model, label, *(["-"] * len(clients)), "-", "-", " ".join(note.split())[:80]])
                continue
            cells = [
                f"{r[n]['tokens_per_s']:.1f}"
                + (
                    f" ({r[n]['tokens_per_s'] / base[n]['tokens_per_s']:.2f}x)"
                    if base and n in base and label != "pocketlm --parallel 1"
                    else ""
                )
                for n in clients
            ]
            last = r[clients[-1]]
            rows.append(
                [
                    model,
                    label,
                    *cells,
                    f"{last['p50_s']:.2f} / {last['p95_s']:.2f}",
                    f"{r[clients[0]]['p50_s']:.2f}",
                    f"{r['peak_rss_mib']:.0f}",
                ]
            )
        target = serve["targets"].get(model)
        best = (
            max(
                (r[clients[-1]]["tokens_per_s"], label)
                for label, r in variants.items()
                if "error" not in r and label.startswith("pocketlm") and label != "pocketlm --parallel 1"
            )
            if base
            else None
        )
        if target and best and clients[-1] in base:
            ratio = best[0] / base[clients[-1]]["tokens_per_s"]
            judged.append(
                [
                    f"{model}: aggregate at {clients[-1]} clients vs `--parallel 1`",
                    f">= {target:g}x",
                    f"{ratio:.2f}x",
                    "**met**" if ratio >= target else "**not met**",
                    best[1],
                ]
            )
        for label, r in variants.items():
            ours = variants.get(label.replace("llama-server -np ", "pocketlm --parallel "), {})
            if not label.startswith("llama-server -np ") or not ours or "error" in ours or "skipped" in ours:
                continue
            if "error" in r or "skipped" in r:
                continue
            ratios = [
                f"{ours[n]['tokens_per_s'] / r[n]['tokens_per_s']:.2f}x" if n in ours and n in r else "-"
                for n in clients
            ]
            n_seq = label.rsplit(" ", 1)[-1]
            cells = f"{ours.get('kv_cells', '?')} / {r.get('kv_cells', '?')}"
            twins.append([model, f"`--parallel {n_seq}` / `-np {n_seq}`", *ratios, cells])
        theirs = variants.get("llama-cpp-python server")
        if best and theirs and "error" not in theirs:
            ratio = best[0] / theirs[clients[-1]]["tokens_per_s"]
            judged.append(
                [
                    f"{model}: vs llama-cpp-python's server at {clients[-1]} clients",
                    ">= 2x",
                    f"{ratio:.2f}x",
                    "**met**" if ratio >= 2 else "**not met**",
                    best[1],
                ]
            )
        if base and clients[0] == "1":
            single = [
                (r["1"]["p50_s"], label)
                for label, r in variants.items()
                if "error" not in r and label.startswith("pocketlm") and label != "pocketlm --parallel 1"
            ]
            for latency, label in single:
                change = latency / base["1"]["p50_s"] - 1
                judged.append(
                    [
                        f"{model}: single-client latency, {label} vs 1",
                        "within 5%",
                        f"{change:+.1%}",
                        "**met**" if change <= 0.05 else "**not met**",
                        "",
                    ]
                )
    score = serve.get("score", {})
    for label, r in score.items():
        if "error" in r:
            continue
        ratio = r["one by one"] / r["batched"]
        judged.append(
            [
                f"bloomz-560m q4_k_m: score() over 8 candidates ({label})",
                ">= 2x",
                f"{ratio:.2f}x",
                "**met**" if ratio >= 2 else "**not met**",
                f"{r['one by one']:.3f} s one by one vs {r['batched']:.3f} s batched",
            ]
        )
    out += table(["target", "goal", "measured", "status", "numbers"], judged) + [""]
    out += table(
        [
            "model",
            "server",
            *[f"{n} clients tok/s" for n in clients],
            f"p50 / p95 s at {clients[-1]}",
            "p50 s alone",
            "peak RSS MiB",
        ],
        rows,
    ) + [""]
    if twins:
        out += [
            "PocketLM / llama-server: `pocketlm serve --parallel N` aggregate tokens/s over `llama-server -np N`'s, "
            "at each client count (above 1: PocketLM is faster).",
            "",
        ]
        header = ["model", "PocketLM / llama-server", *[f"{n} clients" for n in clients], "KV cells"]
        out += table(header, twins) + [""]
    if serve.get("plot"):
        out += [f"![aggregate tokens/s vs concurrent clients](results/{serve['plot']})", ""]
    window = {w: r for w, r in (serve.get("window") or {}).items() if isinstance(r, dict)}
    if window:
        counts = list(next(iter(window.values())))
        out += [
            "CTranslate2's batch window (runtime/core/scheduler.py `BatchScheduler.window`): flan-t5-small int8, "
            "`parallel=16`, N threads calling `generate` at once in one process (median of rounds); the "
            "default is the best measured.",
            "",
        ]
        out += table(
            ["window", *[f"{n} clients tok/s (p50 s)" for n in counts]],
            [
                [f"{float(w) * 1000:g} ms", *[f"{r[n]['tokens_per_s']:.1f} ({r[n]['p50_s']:.2f})" for n in counts]]
                for w, r in window.items()
            ],
        ) + [""]
    return out


def beam_section(beams: dict[str, Any] | None) -> list[str]:
    """Issue 16: 4-beam decoding against transformers' 4-beam generate, and beams' cost over greedy."""
    if not beams:
        return []
    st, k = beams["settings"], beams["num_beams"]
    minutes = beams["wall_s"] / 60
    out = [
        "## Beam search (issue 16)",
        "",
        f"From `benchmarks/results/beams.json` (`{beams['command']}`, {beams['mode']} mode, {minutes:.0f} min, "
        f"{beams.get('date', '?')}), on **random-weight models of the real shapes** (common.py: the speed is the "
        f"real models', the text is noise); {beams['threads']} threads everywhere. Each variant in its own fresh "
        f"processes ({st['processes']} x {st['rounds']} rounds of one greedy and one {k}-beam generation, order "
        "flipped each round, after one warm-up of each; variants interleaved process by process), medians. A "
        f"{st['prompt_tokens']}-token prompt, then exactly {st['new_tokens']} new tokens: `min_new_tokens = "
        "max_new_tokens` masks the end of sequence for every beam until then, in PocketLM as in transformers "
        f"(`generate(num_beams={k}, early_stopping=True, length_penalty=1.0, min_new_tokens=N, max_new_tokens=N)`), "
        "one sequence returned. tok/s = new tokens of the returned sequence / wall time of the call (prompt "
        "included), for greedy and beams alike; `x tf`: against transformers fp32 measured in the same run. "
        f"On llama.cpp the {k} beams are sequences of one batch sharing the prompt's KV cells; on CTranslate2 it is "
        f"its own beam search (`translate_batch(beam_size={k})`).",
        "",
    ]
    if beams["mode"] == "quick":
        out += ["> **Quick mode**: short runs, one process per variant; for checking the script, not for quoting.", ""]
    share, load = beams.get("other_cpu_share_max"), beams.get("load_average_max")
    if share is not None:
        out += [
            f"Machine during the measurements: other processes used at most {share:.0%} of the CPUs while a "
            f"variant's process ran (a process measured above {beams.get('idle_threshold', 0):.0%} is measured "
            f"again, at most twice), load average at most {load:.2f}. That is what this VM sees: time its CPUs lose "
            "to the host is not visible from inside, and shows as runs much slower than their neighbours (the "
            "per-run seconds are in beams.json).",
            "",
        ]
    judged = [
        [t["name"], t["target"], times(t["value"]), "**met**" if t["met"] else "**not met**"] for t in beams["targets"]
    ]
    if judged:
        out += table(["target", "goal", "measured", "status"], judged) + [""]
    body, where = [], []
    for model, rows in beams["models"].items():
        for r in rows:
            if "beams" not in r:
                body.append([model, r["label"], *[""] * 8, f"unavailable: {r.get('error', '?')}"])
                continue
            b, g, vs = r["beams"], r["greedy"], r.get("vs_transformers", {})
            lengths = "/".join(str(x) for x in b["new_tokens"])
            body.append(
                [
                    model,
                    r["label"],
                    lengths,
                    num(b["seconds"], 2),
                    num(b["tokens_per_s"]),
                    times(vs.get("beams")),
                    num(g["seconds"], 2),
                    num(g["tokens_per_s"]),
                    times(vs.get("greedy")),
                    times(r.get("beam_cost")),
                    num(r.get("peak_rss_mib"), 0),
                ]
            )
            be, ge = b.get("engine"), g.get("engine")
            if be and be.get("step_engine_s") is not None:
                step_ratio = be["step_engine_s"] / ge["step_engine_s"] if ge and ge.get("step_engine_s") else None
                where.append(
                    [
                        model,
                        r["label"],
                        num(be["prompt_s"] * 1000, 0),
                        num(ge["step_engine_s"] * 1000, 1) if ge else "–",
                        num(ge["step_other_s"] * 1000, 1) if ge else "–",
                        f"{num(be['step_engine_s'] * 1000, 1)} ({times(step_ratio)})",
                        num(be["step_other_s"] * 1000, 1),
                        pct(be["engine_share"], signed=False),
                        "/".join(str(x) for x in be["step_sequences"]),
                    ]
                )
            elif be:
                where.append(
                    [model, r["label"], "", "", "", "", "", pct(be["engine_share"], signed=False), "(translate_batch)"]
                )
    out += table(
        [
            "model",
            "variant",
            "new tokens",
            f"{k}-beam s",
            f"{k}-beam tok/s",
            "x tf",
            "greedy s",
            "greedy tok/s",
            "x tf",
            f"{k}-beam / greedy time",
            "peak RSS MiB",
        ],
        body,
    ) + [""]
    if where:
        out += [
            "Where the time goes (PocketLM, medians): the engine's calls are timed inside the children "
            "(llama.cpp: `LlamaSession.evaluate`, i.e. batch filling, `llama_decode`, logits copy; CTranslate2: "
            "`translate_batch`); a step is one decoding call after the prompt, every running beam in it "
            "(`sequences per step`); the rest of a step is PocketLM's search in Python and numpy "
            "(log-softmax of each beam's row, top candidates over all beams, forking KV cells).",
            "",
        ]
        out += table(
            [
                "model",
                "variant",
                f"prompt ms ({k} beams)",
                "greedy step: engine ms",
                "greedy step: rest ms",
                f"{k}-beam step: engine ms (x greedy)",
                f"{k}-beam step: rest ms",
                f"engine share of {k}-beam time",
                "sequences per step",
            ],
            where,
        ) + [""]
    probe = {m: x for m, x in (beams.get("ct2_threads") or {}).items() if "1" in x and "2" in x}
    if probe:
        out += [
            f"CTranslate2 called directly (`ctranslate2.Translator`, int8_float32, the same prompts and lengths), "
            f"with 1 and with 2 intra threads, one translator loaded at a time, in turn (1, 2, 1, 2) in one process, "
            f"{st['rounds']} rounds each, medians: whether the engine's own threading sets the CTranslate2 rows "
            "above. Like every child here, it runs with `OMP_NUM_THREADS` and `MKL_NUM_THREADS` set to the thread "
            "count (harness.child_env, for torch), which slows CTranslate2's 1-thread calls somewhat. A speed-up "
            "below 1x means the second thread costs more in synchronisation than it computes; on this 2-vCPU VM "
            "CTranslate2's 2-thread times also varied by up to about 2x from one process to the next while the "
            "1-thread ones held, so the CTranslate2 rows move more between runs than the llama.cpp and transformers "
            "ones.",
            "",
        ]
        rows = []
        for model, x in probe.items():
            for t in ("1", "2"):
                rows.append(
                    [
                        model,
                        t,
                        num(x[t]["greedy_s"], 3),
                        num(x[t]["beams_s"], 3),
                        times(x[t]["beam_cost"]),
                        times(x["1"]["greedy_s"] / x[t]["greedy_s"]) if t == "2" else "–",
                        times(x["1"]["beams_s"] / x[t]["beams_s"]) if t == "2" else "–",
                    ]
                )
        out += table(
            [
                "model",
                "intra threads",
                "greedy s",
                f"{k}-beam s",
                f"{k}-beam / greedy",
                "greedy speed-up of 2 threads",
                f"{k}-beam speed-up of 2 threads",
            ],
            rows,
        ) + [""]
    for model, rows in beams["models"].items():
        for r in rows:
            prof = r.get("profile")
            if not prof:
                continue
            top = ", ".join(f"`{x['function']}` {x['own_s'] * 1000:.0f} ms (x{x['calls']})" for x in prof["top"][:6])
            out += [
                f"cProfile of one more {k}-beam generation of {prof['new_tokens']} tokens, {model} {r['label']} "
                f"({prof['seconds']:.2f} s under the profiler), own time: {top}.",
                "",
            ]
    return out


def method() -> list[str]:
    return [
        "## Method",
        "",
        "- **Models**: random weights in the published shapes (`../shared/model_configs/`, built by `common.py`), "
        "with stand-in "
        "tokenizers; speed and memory are those of the real models, outputs are noise. Prompts are windows of the "
        "benchmark "
        "text's token ids (a byte-level BPE trained on the text itself, ids valid in every vocabulary), different "
        "for every "
        "generation so no engine can reuse a cached prefix.",
        "- **Isolation**: every variant runs in fresh child processes; peak RSS is the child's `ru_maxrss` (wait4), "
        "Python "
        "and the engine libraries included, which the (small) measuring process never inflates.",
        "- **Definitions**: TTFT = time from the call to the first new token (prompt evaluation + one step); prompt "
        "tok/s = "
        "prompt tokens / TTFT; decode tok/s = (new tokens - 1) / (total - TTFT). PocketLM's numbers come from its "
        "`GenerationResult` (`first_token_seconds`, `seconds`), transformers' from a streamer noting the first token.",
        "- **Baseline**: transformers fp32 on CPU (`from_pretrained(dtype=torch.float32)`, "
        "`torch.set_num_threads(2)`), "
        "`generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)`.",
        "- **CTranslate2 compute types**: on CPU CTranslate2 runs `int8` as `int8_float32` (the table shows what "
        "ran), so "
        "those two rows are the same computation and their difference is run-to-run noise. `float32` compute on the "
        "int8 "
        "file expands the weights to float32 at load (4x the memory).",
        "- **Overhead**: llama.cpp is compared with a raw loop on its C API (same context parameters as PocketLM's "
        "backend, logits for the last token only, numpy argmax) and with llama-cpp-python's `Llama` (greedy, "
        "`logits_all=False`, flash attention on as llama.cpp's 'auto' picks on CPU); CTranslate2 with "
        "`Translator.generate_tokens` / `translate_batch` given the same options and compute type.",
        "- **Bytes per decoded token** (roofline): weights read + caches read. *Causal (BLOOM)*: every tensor in the "
        "file; "
        "BLOOM ties its output head to the embedding table, so the table is read in full, as the head, at every step "
        "(only a model with a separate `output.weight` would read a single embedding row). *Seq2seq (T5)*: the "
        "decoder's "
        "tensors + the output head + one embedding row, but not the encoder (run once per prompt); CTranslate2 and "
        "transformers apply the cross-attention k/v projections once to the encoder output and cache the result, while "
        "llama.cpp's t5 graph recomputes them from the encoder output at every step, so for T5 GGUF files they count, "
        "with the encoder output. *Caches*: keys and values of every decoder layer up to the average position (T5: "
        "plus "
        "the cached cross-attention keys and values of the source), f16 in llama.cpp, f32 elsewhere. GGUF "
        "sizes from the file's tensor table; transformers 4 bytes per element; CTranslate2 1 byte + a float32 scale "
        "per "
        "row under int8 compute, 4 bytes under float32. A fraction near 100% means the engine is memory bound and only "
        "smaller weights can make it faster; far below means compute or overhead dominates.",
        "- **Fidelity sequences**: BLOOM scores windows of 256 held-out tokens (`model.logits(ids)`); the T5 scores "
        "held-out span-corruption examples, its training objective (`model.logits(input_ids, decoder_input_ids)`). "
        "The random real-shape models are used for speed only: their near-uniform outputs say nothing about "
        "quantization.",
        "",
    ]


def ray_section(result: dict[str, Any] | None) -> list[str]:
    """Issue 18: the JSONL job in one process vs on 1 and 2 local Ray actors."""
    if not result:
        return []
    out = [
        "## Scale out on Ray (issue 18)",
        "",
        f"From `benchmarks/results/ray.json` (`{result['command']}`, {result['mode']} mode, {result['minutes']} min, "
        f"{result.get('date', '?')}, {result.get('cpu') or 'CPU ?'}, {result['cores']} cores): {result['model']} "
        f"(random weights, real shape), {result['prompts']} prompts, {result['new_tokens']} new tokens each, batch "
        f"size {result['batch_size']}. The whole job end to end (actor start and model load included), settings in "
        f"turn, median of {result['rounds']} rounds. The threads are split between the actors: on a machine this "
        "small two actors cannot be faster than one, so the rows measure what Ray costs, not a speed-up; on a "
        "cluster each node adds its own cores.",
        "",
    ]
    if result["mode"] == "quick":
        out += ["> **Quick mode**: few prompts and rounds; for checking the script, not for quoting.", ""]
    rows = [
        [
            name,
            f"{r['median_s']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['vs_one_process']:.2f}x",
            f"{r['same_tokens_as_one_process']}/{result['prompts']}",
        ]
        for name, r in result["settings"].items()
    ]
    out += table(["setting", "job (s)", "new tokens/s", "vs one process", "same tokens as one process"], rows)
    return out + [""]


def control_section(result: dict[str, Any] | None) -> list[str]:
    """benchmarks/control_bench.py's section (written there, kept here)."""
    if result is None:
        return []
    from control_bench import section

    return section(result) + [""]


def scale_section(result: dict[str, Any] | None) -> list[str]:
    """benchmarks/scale_bench.py's section (written there, kept here)."""
    if result is None:
        return []
    from scale_bench import section

    return section(result) + [""]


def main(argv: list[str]) -> int:
    speed, fidelity, convert, serve = load("speed"), load("fidelity"), load("convert"), load("serve")
    beams, ray = load("beams"), load("ray")
    sections: list[Callable[[], list[str]]] = [
        lambda: quick_banner(speed, fidelity),
        lambda: headline(speed, fidelity),
        lambda: machine(speed, fidelity),
        lambda: reproduce(speed, fidelity),
        lambda: speed_tables(speed),
        lambda: overhead_table(speed),
        lambda: roofline_table(speed),
        lambda: import_section(speed),
        lambda: overhead_section(load("overhead")),
        lambda: serve_section(serve),
        lambda: beam_section(beams),
        lambda: ray_section(ray),
        lambda: control_section(load("control")),
        lambda: convert_section(convert),
        lambda: scale_section(load("scale")),
        lambda: fidelity_section(fidelity),
        method,
    ]
    lines = [
        "# PocketLM benchmarks",
        "",
        "<!-- generated by benchmarks/report.py from benchmarks/results/*.json: edit the scripts, not this file -->",
        "",
    ]
    for section in sections:
        lines += section()
    README.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
