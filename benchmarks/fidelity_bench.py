"""Fidelity of each quant type: next-token distributions against the float32 model.

For every model, the text in benchmarks/data/multilingual.txt (token ids: harness.text_ids)
is scored teacher-forced by the float32 conversion (GGUF f32 for BLOOM, CTranslate2 float32
for the T5 family) and by every quantized variant; per variant: mean KL(f32 || variant) of
the next-token distributions, top-1 agreement, and perplexity of the text. Causal models
score one window (`model.logits(ids)`); seq2seq models score source -> target chunk pairs
(`model.logits(input_ids, decoder_input_ids)`). transformers' own fp32 model is scored too,
as a check of the reference.

Models: the real-shape random checkpoints (bloomz-560m, flan-t5-small, mt0-large) and random
ones built here: small BLOOM and T5 models, each at initialisation scale and with a sharpened
output ("peaked": random models predict near-uniform distributions, on which KL and top-1 say
little), and flan-t5-small's shape with transformers' T5 initialisation (common.py's makes T5
attention saturate, so those models amplify any rounding).
Writes benchmarks/results/fidelity.json and fidelity.png (file size vs KL), then the README.

    .venv/bin/python benchmarks/fidelity_bench.py --quick
    .venv/bin/python benchmarks/fidelity_bench.py [--models small-bloom mt0-large ...]
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
from harness import (
    CACHE,
    REAL_SHAPES,
    ArtifactError,
    artifact,
    child_main,
    error_line,
    is_seq2seq,
    path_bytes,
    run_child,
)

SCRIPT = Path(__file__).resolve()
PLOT = harness.common.RESULTS / "fidelity.png"

# (label, format, quant, compute type): the reference first.
CAUSAL = [("f32 (reference)", "gguf", "f32", None)] + [
    (q, "gguf", q, None) for q in ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")
]
SEQ2SEQ = [
    ("ct2 float32 (reference)", "ct2", "float32", "float32"),
    ("ct2 float16 weights, float32 compute", "ct2", "float16", "float32"),
    ("ct2 int8 weights, float32 compute", "ct2", "int8", "float32"),
    ("ct2 int8, int8 compute (runtime default)", "ct2", "int8", "int8"),
] + [(f"gguf {q}", "gguf", q, None) for q in ("f16", "q8_0", "q4_k_m")]

# Random models built here: (family, builder options, description). "peaked" sharpens the
# output so that the reference's next-token entropy is well below ln(vocab) (values in the
# report); flan-t5-small-hfinit has the real flan-t5-small shape with transformers' T5
# initialisation (see _build_t5) instead of common.py's.
BUILT = {
    "small-bloom": ("bloom", {"std": 0.02}, "small random BLOOM, std 0.02"),
    "small-bloom-peaked": ("bloom", {"std": 0.02, "head_gain": 1.6}, "small random BLOOM, output head x1.6 (peaked)"),
    "small-t5": ("t5", {"head_gain": 1.0}, "small random T5, transformers' initialisation"),
    "small-t5-peaked": ("t5", {"head_gain": 4.0}, "small random T5, output head x4 (peaked)"),
    "flan-t5-small-hfinit": (
        "t5",
        {"head_gain": 1.0, "small": False},
        "flan-t5-small shape, transformers' T5 initialisation",
    ),
}
ALL_MODELS = list(BUILT) + list(REAL_SHAPES)
SMALL_BLOOM = {"hidden": 256, "n_layer": 4, "n_head": 4, "vocab_size": 1024}
SMALL_T5 = {
    "d_model": 256,
    "d_kv": 32,
    "num_heads": 8,
    "d_ff": 640,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "vocab_size": 1024,
}


# -- small random checkpoints -----------------------------------------------------------------


def build_small(name: str) -> Path:
    """A small random checkpoint in results/cache/small/<name> (numpy only), built once."""
    folder = CACHE / "small" / name
    if (folder / "model.safetensors").is_file():
        return folder
    family, options, _ = BUILT[name]
    tmp = folder.with_name(folder.name + ".partial")
    (_build_bloom if family == "bloom" else _build_t5)(tmp, **options)
    tmp.rename(folder)
    return folder


def _build_bloom(folder: Path, std: float, head_gain: float = 1.0) -> None:
    """convert.synthetic's random BLOOM; head_gain scales the (tied) embedding table, which
    scales the logits (the embedding layernorm undoes it on the input side)."""
    from common import write_safetensors_streaming

    from convert.synthetic import SAMPLE_TEXT, bloom_config, random_bloom_weights, train_bloom_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    cfg = bloom_config(SMALL_BLOOM["vocab_size"], SMALL_BLOOM["hidden"], SMALL_BLOOM["n_layer"], SMALL_BLOOM["n_head"])
    weights = random_bloom_weights(cfg, seed=0, std=std)
    weights["word_embeddings.weight"] = (weights["word_embeddings.weight"].astype(np.float32) * head_gain).astype(
        np.float16
    )
    write_safetensors_streaming(
        folder / "model.safetensors", {k: v.shape for k, v in weights.items()}, weights.__getitem__, "F16"
    )
    train_bloom_tokenizer(SAMPLE_TEXT, 1024).save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _build_t5(folder: Path, head_gain: float, small: bool = True) -> None:
    """A Flan-T5-style model (gated GELU, untied head), at small width or flan-t5-small's,
    initialised as transformers initialises T5 (q gets an extra d_kv**-0.5: T5 does not scale attention
    scores, so without it attention saturates and the model amplifies any rounding), with
    lm_head as tests/reference.py builds it (std d_model**-0.5), times head_gain."""
    from common import config, t5_shapes, t5_tokenizer_json, write_safetensors_streaming

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config("flan-t5-small") | (SMALL_T5 if small else {})
    shapes = t5_shapes(cfg)
    rng = np.random.default_rng(0)

    def std(name: str, shape: tuple[int, ...]) -> float:
        if name == "shared.weight":
            return 1.0
        if name.endswith("relative_attention_bias.weight"):
            return cfg["d_model"] ** -0.5
        if name.endswith(".q.weight"):
            return (shape[-1] * cfg["d_kv"]) ** -0.5
        return shape[-1] ** -0.5 * (head_gain if name == "lm_head.weight" else 1.0)

    def make(name: str) -> np.ndarray:
        shape = shapes[name]
        if name.endswith("layer_norm.weight"):
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std(name, shape))

    t5_tokenizer_json(cfg["vocab_size"], folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5TokenizerFast", "extra_ids": 100}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors_streaming(folder / "model.safetensors", shapes, make, "F32")


# -- the child: logits and metrics ----------------------------------------------------------


def sequences(model: str, positions: int) -> list[tuple[list[int], list[int] | None, list[int]]]:
    """(input ids, decoder input ids or None, target ids) whose logits rows predict the targets."""
    ids = harness.text_ids()
    if not is_seq2seq(model):
        window = ids[: positions + 1]
        return [(window[:-1], None, window[1:])]
    cfg = harness.model_config(model)
    eos, start = int(cfg["eos_token_id"]), int(cfg.get("decoder_start_token_id", 0))
    chunk = 64 if positions >= 256 else 32
    out = []
    for k in range(max(1, positions // chunk)):
        src = [ids[(2 * k * chunk + i) % len(ids)] for i in range(chunk)] + [eos]
        tgt = [ids[((2 * k + 1) * chunk + i) % len(ids)] for i in range(chunk)]
        out.append((src, [start] + tgt[:-1], tgt))
    return out


def log_softmax(logits: np.ndarray, rows: int = 64) -> np.ndarray:
    """float32 log-probabilities, computed in float64 a few rows at a time (vocabularies
    are 250k wide)."""
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
        """KL(self || other) per position (mean, max), top-1 agreement, other's perplexity."""
        kl = []
        for lo in range(0, len(self.logp), self.ROWS):
            p, q = self.logp[lo : lo + self.ROWS].astype(np.float64), other.logp[lo : lo + self.ROWS].astype(np.float64)
            kl.append((np.exp(p) * (p - q)).sum(-1))
        kl_all = np.maximum(np.concatenate(kl), 0.0)
        return {
            "kl_mean": float(kl_all.mean()),
            "kl_max": float(kl_all.max()),
            "top1_agreement": float((self.logp.argmax(-1) == other.logp.argmax(-1)).mean()),
            "perplexity": other.perplexity(),
        }


def score(model: str, entry: dict[str, Any], seqs: list[tuple[list[int], list[int] | None, list[int]]]) -> Scores:
    """Teacher-forced scores of one variant (a PocketLM file, or transformers' fp32 model)."""
    import engines

    targets = [t for _, _, tgt in seqs for t in tgt]
    if entry["engine"] == "transformers":
        m = engines.load_transformers(Path(entry["path"]), is_seq2seq(model))
        rows = [engines.hf_logits(m, src, dec) for src, dec, _ in seqs]
    else:
        m = engines.load_pocketlm(Path(entry["path"]), entry.get("compute_type"))
        rows = [m.logits(src) if dec is None else m.logits(src, dec) for src, dec, _ in seqs]
        m.close()
    return Scores(rows, targets)


def job_fidelity(job: dict[str, Any]) -> dict[str, Any]:
    """Score the reference, then compare every other entry with it."""
    model, entries = job["model"], job["entries"]
    seqs = sequences(model, job["positions"])
    started = time.perf_counter()
    ref = score(model, entries[0], seqs)
    vocab = ref.logp.shape[1]
    out: dict[str, Any] = {
        "positions": len(ref.targets),
        "vocab": vocab,
        "log_vocab": float(np.log(vocab)),
        "reference": {"label": entries[0]["label"], "perplexity": ref.perplexity(), "entropy": ref.entropy()},
        "rows": [],
    }
    for entry in entries[1:]:
        row = {"label": entry["label"]}
        try:
            row.update(ref.compare(score(model, entry, seqs)))
        except Exception as e:  # an engine that cannot run this variant: reported, not fatal
            row["error"] = error_line(e)
        out["rows"].append(row)
    out["seconds"] = time.perf_counter() - started
    return out


JOBS = {"fidelity": job_fidelity}


# -- the parent -------------------------------------------------------------------------------


def entries_for(model: str, rebuild: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(what the child scores, the reference first; variants that could not be converted)."""
    src = harness.source_folder(model) if model in REAL_SHAPES else build_small(model)
    entries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for label, fmt, quant, compute in SEQ2SEQ if is_seq2seq(model) else CAUSAL:
        try:
            path = artifact(model, fmt, quant, rebuild)
        except ArtifactError as e:
            if not entries:
                raise
            failed.append({"label": label, "format": fmt, "quant": quant, "error": str(e)})
            continue
        entries.append(
            {
                "label": label,
                "engine": "pocketlm",
                "format": fmt,
                "quant": quant,
                "compute_type": compute,
                "path": str(path),
                "file_bytes": path_bytes(path),
            }
        )
    entries.insert(
        1,
        {
            "label": "transformers fp32 (reference check)",
            "engine": "transformers",
            "format": "hf",
            "quant": "fp32",
            "path": str(src),
            "file_bytes": harness.checkpoint_weight_bytes(src),
        },
    )
    return entries, failed


def measure(model: str, s: harness.Settings, rebuild: bool) -> dict[str, Any]:
    entries, failed = entries_for(model, rebuild)
    job = {"kind": "fidelity", "model": model, "entries": entries, "positions": s.fidelity_positions}
    res = run_child(SCRIPT, job, timeout_s=s.child_timeout_s).result
    by_label = {e["label"]: e for e in entries}
    for row in res["rows"]:
        e = by_label[row["label"]]
        row.update(format=e["format"], quant=e["quant"], compute_type=e.get("compute_type"), file_bytes=e["file_bytes"])
    res["rows"] += failed
    res["reference"]["file_bytes"] = entries[0]["file_bytes"]
    res["model"] = model
    res["description"] = BUILT[model][2] if model in BUILT else "published shape, random weights (common.py)"
    return res


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """File size vs mean KL, one panel per model (log-log; the reference is KL 0, not shown)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return None
    cols = min(3, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results):
        points = [r for r in res["rows"] if "kl_mean" in r and r["format"] != "hf" and r["kl_mean"] > 0]
        for r in points:
            color = "tab:blue" if r["format"] == "gguf" else "tab:orange"
            ax.scatter(r["file_bytes"] / harness.MIB, r["kl_mean"], color=color)
            ax.annotate(
                r["label"].removeprefix("ct2 ").replace(" weights", "").split(" (")[0],
                (r["file_bytes"] / harness.MIB, r["kl_mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers for sizes; minor ticks labelled only when an axis spans few decades
        ax.xaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_title(
            f"{res['model']} (H_ref {res['reference']['entropy']:.2f} / ln V {res['log_vocab']:.2f})", fontsize=9
        )
        ax.set_xlabel("file size (MiB)", fontsize=8)
        ax.set_ylabel("mean KL(f32 || quant), nats", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.suptitle("File size vs KL divergence from the float32 model (blue: GGUF, orange: CTranslate2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{harness.QUICK.fidelity_positions} positions per model")
    parser.add_argument("--models", nargs="*", default=ALL_MODELS, choices=ALL_MODELS)
    parser.add_argument("--rebuild", action="store_true", help="convert the models again (after converter changes)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    parser.add_argument(
        "--keep-others", action="store_true", help="keep the other models' results from the last run in the same mode"
    )
    args = parser.parse_args(argv)
    s = harness.settings(args.quick)
    started = time.perf_counter()
    prev = harness.previous_result("fidelity", s.mode) if args.keep_others else None
    kept = [r for r in prev["results"] if r["model"] not in args.models] if prev else []
    results: list[dict[str, Any]] = []
    for model in args.models:
        print(f"[{s.mode}] {model}", flush=True)
        try:
            res = measure(model, s, args.rebuild)
        except (ArtifactError, RuntimeError) as e:
            res = {"model": model, "error": error_line(e)}
            print(f"  failed: {res['error']}", flush=True)
            results.append(res)
            continue
        results.append(res)
        ref = res["reference"]
        print(
            f"  reference ppl {ref['perplexity']:.1f}, entropy {ref['entropy']:.3f} of ln V {res['log_vocab']:.3f}",
            flush=True,
        )
        for r in res["rows"]:
            if "error" in r:
                print(f"  {r['label']}: unavailable: {r['error']}", flush=True)
            else:
                print(
                    f"  {r['label']}: KL {r['kl_mean']:.3g}, top-1 {r['top1_agreement']:.3f}, ppl "
                    f"{r['perplexity']:.1f}",
                    flush=True,
                )
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    results = sorted(kept + results, key=lambda r: order.get(r["model"], len(order)))
    measured = [r for r in results if "error" not in r]
    image = plot(measured, PLOT) if measured else None
    payload = {
        "mode": s.mode,
        "positions": s.fidelity_positions,
        "command": "python benchmarks/fidelity_bench.py " + " ".join(argv),
        "text": str(harness.TEXT.relative_to(harness.ROOT)),
        "plot": image.name if image else None,
        "built_models": {k: {"family": f, **o, "description": d} for k, (f, o, d) in BUILT.items()},
        "small_shapes": {"bloom": SMALL_BLOOM, "t5": SMALL_T5},
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    path = harness.write_result("fidelity", payload)
    print(f"wrote {path}" + (f" and {image}" if image else ""), flush=True)
    if not args.no_report:
        import report

        report.main([])
    return 0


if __name__ == "__main__":
    if not child_main(JOBS):
        sys.exit(main(sys.argv[1:]))
