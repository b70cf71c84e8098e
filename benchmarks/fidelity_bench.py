"""Fidelity of every quant type on trained models, with and without an importance matrix,
and the speed/fidelity trade of BLOOM's output head type.

The models are benchmarks/reference_models.py's: a small BLOOM and a small T5 trained here on
benchmarks/data/corpus/ (12 languages), so their next-token distributions are peaked as a
real model's are (random models' near-uniform outputs say nothing about quantization). Each
is converted to every type PocketLM writes and scored teacher-forced on held-out text against
its float32 conversion (GGUF f32 for BLOOM, CTranslate2 float32 for the T5): mean / max
KL(f32 || variant) per position, top-1 agreement, perplexity; the T5 also by exact match on its
held-out task (sorting letters), greedy. llama.cpp's quantizer types are
converted a second time with an importance matrix computed on the training text.

Output heads: BLOOM q4_k_m with a q8_0 / q6_k (llama.cpp's default) / q5_k / q4_k head, decode
speed on the bloomz-560m shape (random weights; interleaved rounds in one process, medians) and
fidelity on the trained BLOOM.

Writes benchmarks/results/fidelity.json and fidelity.png (bytes per weight vs KL), then the README.

    .venv/bin/python benchmarks/fidelity_bench.py --quick
    .venv/bin/python benchmarks/fidelity_bench.py [--models trained-t5] [--no-heads]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import reference_models
from harness import ArtifactError, artifact, child_main, error_line, path_bytes, run_child

SCRIPT = Path(__file__).resolve()
PLOT = harness.common.RESULTS / "fidelity.png"
MODELS = reference_models.NAMES  # trained-bloom, trained-t5

# Every GGUF type PocketLM writes, largest first; those llama.cpp's quantizer makes also get
# an importance-matrix twin.
GGUF_TYPES = (
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_1",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "q4_1",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)
DIRECT = ("f16", "bf16", "q8_0")  # written by PocketLM itself: no importance matrix applies
# CTranslate2: (weights, compute type), the runtime's default pick marked.
CT2_VARIANTS = (
    ("float16", "float32"),
    ("bfloat16", "bfloat16"),
    ("int16", "int16"),
    ("int8", "float32"),
    ("int8", "int8_float32"),
    ("int8", "int8_bfloat16"),
)
CT2_DEFAULT = ("int8", "int8_float32")
HEAD_TYPES = ("q8_0", "q6_k", "q5_k", "q4_k")
HEAD_DEFAULT = "q6_k"  # llama.cpp's choice for K-quants
HEAD_QUANT = "q4_k_m"
SPEED_MODEL = "bloomz-560m"


# -- the child: logits, metrics, exact match, head speed ----------------------------------------


def log_softmax(logits: np.ndarray, rows: int = 64) -> np.ndarray:
    """float32 log-probabilities, computed in float64 a few rows at a time."""
    out = np.empty(logits.shape, dtype=np.float32)
    for lo in range(0, len(logits), rows):
        x = logits[lo : lo + rows].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        out[lo : lo + rows] = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return out


class Scores:
    """Log-probabilities of every scored position, kept as float32 [positions, vocab]."""

    ROWS = 64  # rows per float64 slice

    def __init__(self, rows: list[np.ndarray], targets: list[int]):
        self.logp = np.concatenate([log_softmax(r) for r in rows])
        self.targets = np.asarray(targets)

    def perplexity(self) -> float:
        return float(np.exp(-self.logp[np.arange(len(self.targets)), self.targets].astype(np.float64).mean()))

    def entropy(self) -> float:
        """Mean next-token entropy in nats (ln V for a uniform distribution)."""
        total = 0.0
        for lo in range(0, len(self.logp), self.ROWS):
            lp = self.logp[lo : lo + self.ROWS].astype(np.float64)
            total += float(-(np.exp(lp) * lp).sum())
        return total / len(self.logp)

    def compare(self, other: Scores) -> dict[str, float]:
        """KL(self || other) per position (mean, median, 99th percentile, max: a few positions
        can carry most of the mean), top-1 agreement, other's perplexity."""
        kl = []
        for lo in range(0, len(self.logp), self.ROWS):
            p, q = self.logp[lo : lo + self.ROWS].astype(np.float64), other.logp[lo : lo + self.ROWS].astype(np.float64)
            kl.append((np.exp(p) * (p - q)).sum(-1))
        kl_all = np.maximum(np.concatenate(kl), 0.0)
        return {
            "kl_mean": float(kl_all.mean()),
            "kl_median": float(np.median(kl_all)),
            "kl_p99": float(np.quantile(kl_all, 0.99)),  # as llama-perplexity --kl-divergence reports
            "kl_max": float(kl_all.max()),
            "top1_agreement": float((self.logp.argmax(-1) == other.logp.argmax(-1)).mean()),
            "perplexity": other.perplexity(),
        }


Sequences = list[tuple[list[int], list[int] | None, list[int]]]  # (input, decoder input or None, targets)


def sequences(model: str, positions: int) -> Sequences:
    """Held-out text the model never trained on, as rows whose logits predict the targets:
    BLOOM windows of 256 tokens; T5 span-corruption examples (its training objective)."""
    folder = harness.source_folder(model)
    out: Sequences = []
    if harness.is_seq2seq(model):
        for src, dec, tgt in reference_models.heldout_pairs(folder):
            if sum(len(t) for _, _, t in out) >= positions:
                break
            out.append((src, dec, tgt))
        return out
    ids = reference_models.heldout_ids(folder)[: positions + 1]
    for lo in range(0, len(ids) - 1, 256):
        window = ids[lo : lo + 257]
        if len(window) > 1:
            out.append((window[:-1], None, window[1:]))
    return out


def _load(entry: dict[str, Any]) -> Any:
    import engines

    if entry["engine"] == "transformers":
        return engines.load_transformers(Path(entry["path"]), entry["seq2seq"])
    return engines.load_pocketlm(Path(entry["path"]), entry.get("compute_type"))


def score(entry: dict[str, Any], model: Any, seqs: Sequences) -> Scores:
    """Teacher-forced scores of one variant (a PocketLM model, or transformers' fp32 model)."""
    import engines

    targets = [t for _, _, tgt in seqs for t in tgt]
    if entry["engine"] == "transformers":
        rows = [engines.hf_logits(model, src, dec) for src, dec, _ in seqs]
    else:
        rows = [model.logits(src) if dec is None else model.logits(src, dec) for src, dec, _ in seqs]
    return Scores(rows, targets)


def task_score(model: Any, items: list[tuple[str, str]]) -> float:
    """The T5 task's exact match with PocketLM's greedy generation."""

    def generate(sources: list[str]) -> list[str]:
        results = model.generate_batch(sources, max_new_tokens=reference_models.TASK_MAX_NEW_TOKENS)
        return [r.text for r in results]

    return reference_models.exact_match(generate, items)


def job_fidelity(job: dict[str, Any]) -> dict[str, Any]:
    """Score the reference, then compare every other entry with it (and the task, for T5)."""
    model_name, entries = job["model"], job["entries"]
    seqs = sequences(model_name, job["positions"])
    items = reference_models.task_items("heldout")[: job["task_items"]] if job["task_items"] else []
    started = time.perf_counter()
    ref_model = _load(entries[0])
    ref = score(entries[0], ref_model, seqs)
    reference = {"label": entries[0]["label"], "perplexity": ref.perplexity(), "entropy": ref.entropy()}
    if items:
        reference["exact_match"] = task_score(ref_model, items)
    ref_model.close()
    out: dict[str, Any] = {
        "positions": len(ref.targets),
        "vocab": ref.logp.shape[1],
        "log_vocab": float(np.log(ref.logp.shape[1])),
        "reference": reference,
        "task_items": len(items),
        "rows": [],
    }
    for entry in entries[1:]:
        row: dict[str, Any] = {"label": entry["label"]}
        try:
            m = _load(entry)
            try:
                row.update(ref.compare(score(entry, m, seqs)))
                if items and entry["engine"] != "transformers":
                    row["exact_match"] = task_score(m, items)
            finally:
                if entry["engine"] != "transformers":
                    m.close()
        except Exception as e:  # an engine that cannot run this variant: reported, not fatal
            row["error"] = error_line(e)
        out["rows"].append(row)
    out["seconds"] = time.perf_counter() - started
    return out


def job_heads(job: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s of each head variant: all loaded at once, interleaved rounds, medians."""
    import engines

    ids = harness.text_ids()
    prompt = harness.prompt(ids, job["prompt_tokens"], 0)
    n = job["new_tokens"]
    models = {e["label"]: engines.load_pocketlm(Path(e["path"])) for e in job["entries"]}
    rates: dict[str, list[float]] = {label: [] for label in models}
    for m in models.values():  # warm-up: page faults, allocators
        m.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    for _ in range(job["rounds"]):
        for label, m in models.items():
            r = m.generate(prompt, max_new_tokens=n, min_new_tokens=n)
            rates[label].append((len(r.token_ids) - 1) / (r.seconds - r.first_token_seconds))
    for m in models.values():
        m.close()
    return {"decode_tok_s": {k: harness.median(v) for k, v in rates.items()}, "samples": rates}


JOBS = {"fidelity": job_fidelity, "heads": job_heads}


# -- the parent ---------------------------------------------------------------------------------


def _entry(label: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"label": label, "engine": "pocketlm", "path": str(path), "file_bytes": path_bytes(path), **extra}


def imatrix_for(model: str) -> tuple[Path, dict[str, Any]]:
    """The importance matrix of a trained model over its training text (never the held-out
    text), computed once with llama.cpp on the f32 GGUF and cached beside the artifacts."""
    path = harness.ARTIFACTS / f"{model}.imatrix.gguf"
    calib = harness.ARTIFACTS / f"{model}.calibration.txt"
    f32 = artifact(model, "gguf", "f32")
    if not path.is_file() or path.stat().st_mtime < f32.stat().st_mtime:
        from pocketlm.converters.imatrix import compute

        text = "\n\n".join(reference_models.train_paragraphs())
        calib.write_text(text, encoding="utf-8")
        print(f"  importance matrix of {model} over {len(text.encode()) / 1024:.0f} KiB of training text", flush=True)
        started = time.perf_counter()
        matrix = compute(f32, text, dataset=calib.name, threads=harness.THREADS)
        matrix.save(path)
        (path.with_suffix(".json")).write_text(
            json.dumps({"seconds": time.perf_counter() - started, "chunks": matrix.chunks})
        )
    info = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
    from pocketlm.converters.imatrix import ImportanceMatrix

    matrix = ImportanceMatrix.load(path)
    # how unequal the columns are: the matrix can only help where some columns carry far more
    # activation power than others (real LLMs' outlier features)
    spread = [float(v.max() / max(np.median(v), 1e-30)) for v in matrix.means().values()]
    return path, {
        "chunks": matrix.chunks,
        "chunk_size": matrix.chunk_size,
        "matrices": len(matrix.sums),
        "seconds": info.get("seconds"),
        "column_spread_median": float(np.median(spread)),
        "column_spread_max": max(spread),
    }


def entries_for(model: str, rebuild: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(what the child scores, the reference first; variants that could not be converted;
    the importance matrix used)."""
    seq2seq = harness.is_seq2seq(model)
    src = reference_models.ensure(model)
    matrix_path, matrix_info = imatrix_for(model)
    entries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []

    def add(label: str, fmt: str, quant: str, compute: str | None = None, **opts: Any) -> None:
        try:
            path = artifact(model, fmt, quant, rebuild, **opts)
        except ArtifactError as e:
            if not entries:
                raise
            failed.append({"label": label, "format": fmt, "quant": quant, "error": str(e)})
            return
        entries.append(
            _entry(
                label,
                path,
                format=fmt,
                quant=quant,
                compute_type=compute,
                imatrix="imatrix" in opts,
                output_type=opts.get("output_type"),
                seq2seq=seq2seq,
            )
        )

    if seq2seq:
        add("ct2 float32 (reference)", "ct2", "float32", "float32")
        for weights, compute in CT2_VARIANTS:
            tag = " (runtime default)" if (weights, compute) == CT2_DEFAULT else ""
            add(f"ct2 {weights} weights, {compute} compute{tag}", "ct2", weights, compute)
        add("gguf f32", "gguf", "f32")
    else:
        add("gguf f32 (reference)", "gguf", "f32")
    for q in GGUF_TYPES:
        add(f"gguf {q}", "gguf", q)
        if q not in DIRECT:
            add(f"gguf {q} + imatrix", "gguf", q, imatrix=matrix_path)
    if not seq2seq:
        for head in HEAD_TYPES:
            if head != HEAD_DEFAULT:
                add(f"gguf {HEAD_QUANT}, {head} head", "gguf", HEAD_QUANT, output_type=head)
    entries.insert(
        1,
        {
            "label": "transformers fp32 (reference check)",
            "engine": "transformers",
            "format": "hf",
            "quant": "fp32",
            "path": str(src),
            "seq2seq": seq2seq,
            "file_bytes": harness.checkpoint_weight_bytes(src),
        },
    )
    return entries, failed, matrix_info


def measure(model: str, s: harness.Settings, rebuild: bool, task_items: int) -> dict[str, Any]:
    entries, failed, matrix_info = entries_for(model, rebuild)
    job = {
        "kind": "fidelity",
        "model": model,
        "entries": entries,
        "positions": s.fidelity_positions,
        "task_items": task_items if harness.is_seq2seq(model) else 0,
    }
    res = run_child(SCRIPT, job, timeout_s=s.child_timeout_s * 3).result
    params = parameters(Path(entries[0]["path"]) if not harness.is_seq2seq(model) else artifact(model, "gguf", "f32"))
    by_label = {e["label"]: e for e in entries}
    for row in res["rows"]:
        e = by_label[row["label"]]
        row.update(
            {k: e.get(k) for k in ("format", "quant", "compute_type", "imatrix", "output_type", "file_bytes")},
            bytes_per_weight=e["file_bytes"] / params if params else None,
        )
    res["rows"] += failed
    res["reference"]["file_bytes"] = entries[0]["file_bytes"]
    res["reference"]["bytes_per_weight"] = entries[0]["file_bytes"] / params if params else None
    res["model"] = model
    res["parameters"] = params
    res["imatrix"] = matrix_info
    res["training"] = reference_models_training(model)
    return res


def parameters(gguf_file: Path) -> int:
    """Weights in a model: the elements of its f32 GGUF's tensors."""
    from pocketlm.converters.core.gguf_file import read_header

    return sum(int(np.prod(t.shape)) for t in read_header(gguf_file).tensors)


def reference_models_training(model: str) -> dict[str, Any]:
    path = harness.source_folder(model) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_heads(s: harness.Settings, rebuild: bool) -> dict[str, Any]:
    """Head types' decode speed on the bloomz-560m shape (fidelity comes from trained-bloom's rows)."""
    entries = []
    for head in HEAD_TYPES:
        opts = {} if head == HEAD_DEFAULT else {"output_type": head}
        path = artifact(SPEED_MODEL, "gguf", HEAD_QUANT, rebuild, **opts)
        entries.append({"label": head, "path": str(path), "file_bytes": path_bytes(path)})
    job = {
        "kind": "heads",
        "entries": entries,
        "prompt_tokens": s.prompt_tokens,
        "new_tokens": s.new_tokens,
        "rounds": 3 if s.quick else 7,
    }
    res = run_child(SCRIPT, job, timeout_s=s.child_timeout_s * 3).result
    rows = []
    base = res["decode_tok_s"][HEAD_DEFAULT]
    for e in entries:
        rate = res["decode_tok_s"][e["label"]]
        rows.append(
            {
                "head": e["label"],
                "file_bytes": e["file_bytes"],
                "decode_tok_s": rate,
                "vs_default": rate / base if base else None,
                "samples": res["samples"][e["label"]],
            }
        )
    return {
        "model": SPEED_MODEL,
        "cpu": harness.machine_details().get("cpu"),
        "quant": HEAD_QUANT,
        "default": HEAD_DEFAULT,
        "prompt_tokens": s.prompt_tokens,
        "new_tokens": s.new_tokens,
        "rounds": job["rounds"],
        "rows": rows,
    }


# -- targets, plot, main ------------------------------------------------------------------------


def _row(res: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
    if not res:
        return None
    return next((r for r in res["rows"] if r["label"] == label and "error" not in r), None)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's targets, judged on the measured rows."""
    by_model = {r["model"]: r for r in results if "error" not in r}
    bloom, t5 = by_model.get("trained-bloom"), by_model.get("trained-t5")
    out = []

    def check(name: str, row: dict[str, Any] | None, top1: float, kl: float | None = None) -> None:
        if row is None:
            out.append({"name": name, "met": None, "detail": "not measured"})
            return
        met = row["top1_agreement"] >= top1 and (kl is None or row["kl_mean"] <= kl)
        detail = f"top-1 {row['top1_agreement']:.2%}, KL {row['kl_mean']:.2g}"
        goal = f"top-1 >= {top1:.0%}" + (f", KL <= {kl}" if kl is not None else "")
        out.append({"name": name, "goal": goal, "met": met, "detail": detail})

    for model, res in (("trained-bloom", bloom), ("trained-t5", t5)):
        check(f"{model} gguf q8_0", _row(res, "gguf q8_0"), 0.99, 0.002)
    check("trained-t5 ct2 int8, float32 compute", _row(t5, "ct2 int8 weights, float32 compute"), 0.99, 0.002)
    check(
        "trained-t5 ct2 int8, int8_float32 compute (runtime default)",
        _row(t5, "ct2 int8 weights, int8_float32 compute (runtime default)"),
        0.99,
        0.002,
    )
    for model, res in (("trained-bloom", bloom), ("trained-t5", t5)):
        check(f"{model} gguf q4_k_m", _row(res, "gguf q4_k_m"), 0.95)
    for model, res in (("trained-bloom", bloom), ("trained-t5", t5)):
        for q in ("q3_k_m", "q3_k_s", "q2_k"):
            plain, guided = _row(res, f"gguf {q}"), _row(res, f"gguf {q} + imatrix")
            name = f"{model} {q}: importance matrix lowers KL"
            if plain is None or guided is None:
                out.append({"name": name, "goal": "by >= 20%", "met": None, "detail": "not measured"})
                continue
            cut = 1 - guided["kl_mean"] / plain["kl_mean"]
            out.append(
                {
                    "name": name,
                    "goal": "by >= 20%",
                    "met": cut >= 0.2,
                    "value": cut,
                    "detail": f"KL {plain['kl_mean']:.3g} -> {guided['kl_mean']:.3g} ({-cut:+.0%})",
                }
            )
    return out


LINE_TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")  # the plot's lines


def _line(rows: list[dict[str, Any]], imatrix: bool) -> list[dict[str, Any]]:
    pts = [r for r in rows if bool(r.get("imatrix")) == imatrix and r["quant"] in LINE_TYPES]
    return sorted(pts, key=lambda r: r["bytes_per_weight"])


def _xy(pts: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    return [r["bytes_per_weight"] for r in pts], [r["kl_mean"] for r in pts]


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Bytes per weight vs mean KL (log-log), per trained model: a line through the main GGUF
    types without and with the importance matrix, the other GGUF types and CTranslate2's
    variants as points."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes.flat, results):
        rows = [
            r
            for r in res["rows"]
            if "kl_mean" in r and r.get("bytes_per_weight") and r["kl_mean"] > 0 and not r.get("output_type")
        ]
        gguf = [r for r in rows if r["format"] == "gguf"]

        ax.plot(*_xy(_line(gguf, False)), marker="o", color="tab:blue", label="GGUF (main types)")
        guided = _line(gguf, True)
        ax.plot(*_xy(guided), marker="s", color="tab:green", linestyle="--", label="GGUF + importance matrix")
        others = [r for r in gguf if r["quant"] not in LINE_TYPES]
        plain = [r for r in others if not r.get("imatrix")]
        ax.scatter(*_xy(plain), s=14, color="tab:blue", alpha=0.45, label="other GGUF types")
        ax.scatter(*_xy([r for r in others if r.get("imatrix")]), s=14, marker="s", color="tab:green", alpha=0.45)
        ct2 = [r for r in rows if r["format"] == "ct2"]
        if ct2:
            ax.scatter(*_xy(ct2), marker="^", color="tab:orange", label="CTranslate2 (weights/compute)")
        for r in _line(gguf, False) + ct2:
            short = r["label"].removeprefix("gguf ").removeprefix("ct2 ").split(" (")[0]
            short = short.replace(" weights, ", "/").replace(" compute", "")
            xy_ = (r["bytes_per_weight"], r["kl_mean"])
            ax.annotate(short, xy_, fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("bytes per weight (file size / parameters)", fontsize=8)
        ax.set_ylabel("mean KL(f32 || variant), nats", fontsize=8)
        ref = res["reference"]
        ax.set_title(
            f"{res['model']} (perplexity {ref['perplexity']:.1f}, "
            f"entropy {ref['entropy']:.2f} of ln V {res['log_vocab']:.2f})",
            fontsize=9,
        )
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Trained models: bytes per weight vs KL from float32, with and without an importance matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{harness.QUICK.fidelity_positions} positions per model")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-heads", action="store_true", help="skip the output head speed measurement")
    parser.add_argument("--rebuild", action="store_true", help="convert the models again (after converter changes)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    parser.add_argument(
        "--keep-others", action="store_true", help="keep the other parts' results from the last run in the same mode"
    )
    args = parser.parse_args(argv)
    s = harness.settings(args.quick)
    task_items = 200 if args.quick else 800
    started = time.perf_counter()
    prev = harness.previous_result("fidelity", s.mode) if args.keep_others else None
    kept = [r for r in prev.get("results", []) if r["model"] not in args.models] if prev else []
    results: list[dict[str, Any]] = []
    for model in args.models:
        print(f"[{s.mode}] {model}", flush=True)
        try:
            res = measure(model, s, args.rebuild, task_items)
        except (ArtifactError, RuntimeError) as e:
            res = {"model": model, "error": error_line(e)}
            print(f"  failed: {res['error']}", flush=True)
            results.append(res)
            continue
        results.append(res)
        ref = res["reference"]
        print(
            f"  reference ppl {ref['perplexity']:.2f}, entropy {ref['entropy']:.3f} of ln V {res['log_vocab']:.3f}"
            + (f", exact match {ref['exact_match']:.3f}" if "exact_match" in ref else ""),
            flush=True,
        )
        for r in res["rows"]:
            if "error" in r:
                print(f"  {r['label']}: unavailable: {r['error']}", flush=True)
            else:
                em = f", exact {r['exact_match']:.3f}" if "exact_match" in r else ""
                print(
                    f"  {r['label']}: KL {r['kl_mean']:.3g}, top-1 {r['top1_agreement']:.4f}, ppl "
                    f"{r['perplexity']:.2f}{em}",
                    flush=True,
                )
    heads = None
    if not args.no_heads:
        print(f"[{s.mode}] output heads on the {SPEED_MODEL} shape", flush=True)
        try:
            heads = measure_heads(s, args.rebuild)
            for r in heads["rows"]:
                print(f"  {r['head']}: {r['decode_tok_s']:.1f} tok/s ({r['vs_default']:.3f}x q6_k)", flush=True)
        except (ArtifactError, RuntimeError) as e:
            heads = {"error": error_line(e)}
            print(f"  failed: {heads['error']}", flush=True)
    elif prev and args.keep_others:
        heads = prev.get("heads")
    order = {m: i for i, m in enumerate(MODELS)}
    results = sorted(kept + results, key=lambda r: order.get(r["model"], len(order)))
    measured = [r for r in results if "error" not in r]
    image = plot(measured, PLOT) if measured else None
    payload = {
        "mode": s.mode,
        "positions": s.fidelity_positions,
        "command": "python benchmarks/fidelity_bench.py " + " ".join(argv),
        "text": "held-out paragraphs of benchmarks/data/corpus/ (reference_models.heldout_text)",
        "plot": image.name if image else None,
        "results": results,
        "heads": heads,
        "targets": targets(results),
        "wall_s": time.perf_counter() - started,
    }
    path = harness.write_result("fidelity", payload)
    print(f"wrote {path}" + (f" and {image}" if image else ""), flush=True)
    for t in payload["targets"]:
        print(f"  target {t['name']}: {t.get('goal', '')} -> {t['met']} ({t['detail']})", flush=True)
    if not args.no_report:
        import report

        report.main([])
    return 0


if __name__ == "__main__":
    if not child_main(JOBS):
        sys.exit(main(sys.argv[1:]))
