"""Trained reference models for the fidelity benchmark: a small BLOOM and a small Flan-T5-style
T5, trained here on benchmarks/data/corpus/ so that their next-token distributions are peaked
(random models' are near-uniform, on which KL and top-1 say little).

Deterministic from SEED (same machine and thread count, same weights), trained once and cached
in results/cache/trained/<name>/ as Hugging Face checkpoints with a training.json. Every weight
matrix has rows of a multiple of 256 values, so llama.cpp's K-quants apply to every one.

- trained-bloom: causal LM on the training paragraphs (byte-level BPE, BLOOM's pre-tokenizer).
- trained-t5: T5 span corruption on the same paragraphs, mixed with a task whose answers can be
  checked: sorting 5 to 9 distinct letters ("sort: q d m a" -> "a d m q"; held-out letter sets
  never trained on). Spelling integers out in words (en/fr/es/de) was tried first: in this
  budget the model did not learn to read a digit by its place (T5 has no absolute positions,
  its cross-attention none at all), and the loss stalled far from exact answers.

The last ~10% of each language's paragraphs are held out (heldout_text()): never trained on,
used for scoring. Torch and transformers are imported only to train and check.

    .venv/bin/python benchmarks/reference_models.py [--rebuild] [--only bloom|t5] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # importable from the repository root too
    sys.path.insert(0, str(HERE))
from common import CACHE, ROOT, config  # noqa: E402

CORPUS = HERE / "data" / "corpus"
TRAINED = CACHE / "trained"
LANGUAGES = ("en", "fr", "es", "pt", "de", "it", "id", "vi", "zh", "ar", "hi", "ru")
NAMES = ("trained-bloom", "trained-t5")
SEED = 0
THREADS = 2
HELDOUT_FRACTION = 0.1

BLOOM = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "n_layer": 4,
    "n_head": 4,
    "seq_len": 256,
    "batch": 8,
    "steps": 400,
    "lr": 2e-3,
    "warmup": 100,
    "weight_decay": 0.1,
    "dropout": 0.1,
}
T5 = {
    "vocab_size": 4096,  # 3996 pieces (<pad> 0, </s> 1, <unk> 2 first), then 100 sentinels
    "d_model": 256,
    "d_ff": 1024,
    "num_heads": 4,
    "d_kv": 64,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "span_len": 128,  # tokens of text per span-corruption example
    "span_batch": 16,
    "task_batch": 128,
    "task_every": 4,  # of every task_every + 1 steps, task_every are task batches
    "steps": 1200,
    "lr": 1e-3,
    "warmup": 100,
    "weight_decay": 0.01,
    "dropout": 0.0,
}
T5_EXTRA_IDS = 100
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0
TASK_LETTERS = (5, 9)  # distinct letters per item, at least and at most
TASK_TRAIN, TASK_HELDOUT = 60000, 1000
TASK_MAX_NEW_TOKENS = 16  # the longest answer is 9 letters and </s>


# -- the corpus and its split -----------------------------------------------------------------


def corpus() -> dict[str, list[str]]:
    """Paragraphs per language from data/corpus/<lang>.txt (separated by blank lines)."""
    out = {}
    for path in sorted(CORPUS.glob("*.txt")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        out[path.stem] = [p.strip() for p in text.split("\n\n") if p.strip()]
    return out


def corpus_sha256() -> str:
    """Of every corpus file, in name order: a trained model is valid for this corpus only."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CORPUS.glob("*.txt")))).hexdigest()


def _heldout_count(n: int) -> int:
    k = max(2, round(n * HELDOUT_FRACTION))
    return k if k < n else n // 2


def split() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(training, held-out) paragraphs per language: the last ~10% (at least 2) are held out."""
    train, heldout = {}, {}
    for lang, paragraphs in corpus().items():
        k = _heldout_count(len(paragraphs))
        train[lang], heldout[lang] = paragraphs[: len(paragraphs) - k], paragraphs[len(paragraphs) - k :]
    return train, heldout


def train_paragraphs() -> list[str]:
    return [p for ps in split()[0].values() for p in ps]


def heldout_text() -> str:
    """The held-out paragraphs of every language, blank-line separated (never trained on)."""
    return "\n\n".join(p for ps in split()[1].values() for p in ps) + "\n"


# -- the T5 task: sorting letters --------------------------------------------------------------


def _letter_sets(rng: np.random.Generator) -> Iterator[tuple[str, ...]]:
    """Endless random sets of TASK_LETTERS distinct lowercase letters, in random order."""
    lo, hi = TASK_LETTERS
    while True:
        k = int(rng.integers(lo, hi + 1))
        yield tuple(chr(97 + int(i)) for i in rng.choice(26, k, replace=False))


def _task_item(letters: Sequence[str]) -> tuple[str, str]:
    return "sort: " + " ".join(letters), " ".join(sorted(letters))


def task_items(split: str = "heldout") -> list[tuple[str, str]]:
    """(source, expected answer) pairs of the T5 task, "sort: q d m a" -> "a d m q":
    "heldout" (TASK_HELDOUT items) or "train" (TASK_TRAIN items); no held-out letter set is
    in the training items, in any order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split is 'train' or 'heldout', not {split!r}")
    sets = _letter_sets(np.random.default_rng(SEED + 2))
    held: dict[frozenset[str], tuple[str, ...]] = {}
    while len(held) < TASK_HELDOUT:
        letters = next(sets)
        held.setdefault(frozenset(letters), letters)
    if split == "heldout":
        return [_task_item(letters) for letters in held.values()]
    train = []
    while len(train) < TASK_TRAIN:
        letters = next(sets)
        if frozenset(letters) not in held:
            train.append(_task_item(letters))
    return train


def exact_match(generate: Callable[[list[str]], list[str]], items: Sequence[tuple[str, str]], batch: int = 64) -> float:
    """Share of items whose generated text (stripped) is the expected answer. `generate` maps
    a batch of sources to greedy outputs; give it max_new_tokens >= TASK_MAX_NEW_TOKENS."""
    hits = 0
    for lo in range(0, len(items), batch):
        chunk = items[lo : lo + batch]
        outputs = generate([src for src, _ in chunk])
        hits += sum(out.strip() == answer for out, (_, answer) in zip(outputs, chunk))
    return hits / len(items)


# -- tokenizers ---------------------------------------------------------------------------------


def _train_t5_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A T5-style SentencePiece unigram tokenizer.json trained with `tokenizers`: <pad> 0,
    </s> 1, <unk> 2, the pieces, then <extra_id_99> ... <extra_id_0> as the last ids; no
    normalizer (byte fallback is not possible: llama.cpp's unigram tokenizer lacks it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pipeline(tok: Any) -> Any:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
        tok.decoder = decoders.Metaspace()
        return tok

    special = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - T5_EXTRA_IDS,
        special_tokens=special,
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=16,
    )
    base = pipeline(Tokenizer(models.Unigram()))
    base.train_from_iterator(texts, trainer=trainer)
    pieces = json.loads(base.to_str())["model"]["vocab"]
    if [p for p, _ in pieces[:3]] != special:
        raise RuntimeError(f"unexpected first pieces {pieces[:3]}")
    if len(pieces) != vocab_size - T5_EXTRA_IDS:
        raise RuntimeError(f"the unigram trainer made {len(pieces)} pieces, not {vocab_size - T5_EXTRA_IDS}")
    sentinels = [(f"<extra_id_{T5_EXTRA_IDS - 1 - j}>", 0.0) for j in range(T5_EXTRA_IDS)]
    tok = pipeline(Tokenizer(models.Unigram([tuple(p) for p in pieces] + sentinels, unk_id=2, byte_fallback=False)))
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special + [s for s, _ in sentinels]])
    return tok


def _save_tokenizer(tok: Any, folder: Path, **special: str) -> None:
    """tokenizer.json and tokenizer_config.json as transformers saves them."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)


def tokenizer_report(folder: Path) -> dict[str, Any]:
    """Per language, on the held-out text: tokens per character, unknown-token rate, and
    whether decode(encode(text)) gives the text back (whitespace runs collapsed for the T5)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "config.json").read_text())
    unk = 2 if cfg["model_type"] == "t5" else None
    out: dict[str, Any] = {}
    total = unknown = 0
    for lang, paragraphs in split()[1].items():
        text = "\n\n".join(paragraphs)
        ids = tok.encode(text, add_special_tokens=False).ids
        n_unk = sum(i == unk for i in ids)
        back = tok.decode(ids, skip_special_tokens=False)
        want = " ".join(text.split()) if unk is not None else text
        unknown_chars = sorted(
            {c for c in set(text) if not c.isspace() and unk in tok.encode(c, add_special_tokens=False).ids}
        )
        out[lang] = {
            "chars": len(text),
            "tokens": len(ids),
            "unk_rate": n_unk / len(ids),
            "round_trip": back == want,
            "unknown_chars": "".join(unknown_chars)[:40],
        }
        total, unknown = total + len(ids), unknown + n_unk
    return {"unk_rate": unknown / total, "tokens": total, "languages": out}


# -- data streams -------------------------------------------------------------------------------


def _token_windows(paragraphs: list[list[int]], length: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless windows of `length` ids: each epoch shuffles the paragraphs, concatenates them
    and cuts the stream from a random offset."""
    while True:
        order = rng.permutation(len(paragraphs))
        stream = [t for i in order for t in paragraphs[i]]
        start = int(rng.integers(0, length))
        for lo in range(start, len(stream) - length + 1, length):
            yield stream[lo : lo + length]


def _segments(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random split of `total` into `n` positive parts."""
    cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False)) if n > 1 else np.array([], dtype=int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corruption(
    ids: list[int], rng: np.random.Generator, vocab_size: int, eos: int = 1
) -> tuple[list[int], list[int]]:
    """T5's span corruption: ~15% of the ids in spans of mean length 3, each replaced in the
    source by a sentinel (<extra_id_0> = vocab_size - 1, ...); the target lists the sentinels
    and the spans they replaced. Both end with </s>."""
    n = len(ids)
    n_noise = min(max(1, round(n * NOISE_DENSITY)), n - 1)
    n_spans = max(1, min(round(n_noise / MEAN_SPAN), n - n_noise))
    noise, keep = _segments(n_noise, n_spans, rng), _segments(n - n_noise, n_spans, rng)
    src: list[int] = []
    tgt: list[int] = []
    pos = 0
    for k, (kept, masked) in enumerate(zip(keep, noise)):
        sentinel = vocab_size - 1 - k
        src += ids[pos : pos + kept] + [sentinel]
        tgt += [sentinel] + ids[pos + kept : pos + kept + masked]
        pos += kept + masked
    return src + [eos], tgt + [eos]


def heldout_ids(folder: Path) -> list[int]:
    """Token ids of heldout_text() with the checkpoint's tokenizer (no special tokens)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(heldout_text(), add_special_tokens=False).ids


def heldout_pairs(folder: Path, length: int | None = None) -> list[tuple[list[int], list[int], list[int]]]:
    """Held-out span-corruption examples for a T5 checkpoint, as fidelity_bench.sequences gives
    them: (input ids, decoder input ids, target ids); fixed masks (seeded), every held-out
    token in one window."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    length = length or T5["span_len"]
    rng = np.random.default_rng(SEED + 1)
    out = []
    for paragraphs in split()[1].values():
        stream = [t for p in paragraphs for t in tok.encode(p, add_special_tokens=False).ids]
        for lo in range(0, len(stream), length):
            window = stream[lo : lo + length]
            if len(window) < 8:
                continue
            src, tgt = span_corruption(window, rng, vocab)
            out.append((src, [0] + tgt[:-1], tgt))
    return out


# -- training -------------------------------------------------------------------------------------


def _optimizer(model: Any, recipe: dict[str, Any]) -> tuple[Any, Any]:
    """AdamW (no decay on norms and biases), linear warmup then cosine to 10% of the peak."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe["lr"],
        betas=(0.9, 0.999),
    )

    def factor(step: int) -> float:
        if step < recipe["warmup"]:
            return (step + 1) / recipe["warmup"]
        done = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _stats(logits: Any, targets: Any) -> tuple[float, float, int]:
    """(sum of target NLL, sum of entropy, count) over positions whose target is not -100."""
    import torch

    keep = targets != -100
    logp = torch.log_softmax(logits[keep].double(), -1)
    nll = -logp.gather(-1, targets[keep].unsqueeze(-1)).sum()
    entropy = -(logp.exp() * logp).sum()
    return float(nll), float(entropy), int(keep.sum())


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)


def _log(message: str, started: float) -> None:
    print(f"  [{time.perf_counter() - started:6.0f} s] {message}", flush=True)


def _bloom_heldout(model: Any, ids: list[int], window: int) -> tuple[float, float, int]:
    """(perplexity, mean next-token entropy, positions) over consecutive windows of the ids."""
    import torch

    nll = ent = 0.0
    count = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[lo : lo + window + 1]])
            a, b, c = _stats(model(input_ids=x[:, :-1]).logits[0], x[0, 1:])
            nll, ent, count = nll + a, ent + b, count + c
    model.train(was_training)
    return math.exp(nll / count), ent / count, count


def _train_bloom(folder: Path, seed: int) -> dict[str, Any]:
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from pocketlm.converters.synthetic import SPECIAL_TOKENS, train_bloom_tokenizer

    r = BLOOM
    started = time.perf_counter()
    _seed(seed)
    texts = train_paragraphs()
    tok = train_bloom_tokenizer([t + "\n\n" for t in texts], r["vocab_size"])
    if tok.get_vocab_size() != r["vocab_size"]:
        raise RuntimeError(f"the BPE reached {tok.get_vocab_size()} tokens, not {r['vocab_size']}")
    _save_tokenizer(
        tok,
        folder,
        unk_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[3],
    )
    paragraphs = [tok.encode(t + "\n\n").ids for t in texts]
    heldout = heldout_ids(folder)
    _log(f"tokenizer: {r['vocab_size']} ids, {sum(map(len, paragraphs))} training tokens", started)

    cfg = BloomConfig(
        vocab_size=r["vocab_size"],
        hidden_size=r["hidden_size"],
        n_layer=r["n_layer"],
        n_head=r["n_head"],
        hidden_dropout=r["dropout"],
        attention_dropout=0.0,
        layer_norm_epsilon=1e-5,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = BloomForCausalLM(cfg)
    opt, sched = _optimizer(model, r)
    windows = _token_windows(paragraphs, r["seq_len"], np.random.default_rng(seed))
    losses: list[float] = []
    model.train()
    for step in range(r["steps"]):
        x = torch.tensor([next(windows) for _ in range(r["batch"])])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 99 or step == r["steps"] - 1:
            note = ""
            if step % 200 == 199:  # logged only: no choice depends on the held-out text
                ppl, entropy, _ = _bloom_heldout(model, heldout, r["seq_len"])
                note = f", held-out perplexity {ppl:.1f}, entropy {entropy:.2f}"
            _log(f"step {step + 1}/{r['steps']}: train loss {np.mean(losses[-100:]):.3f}{note}", started)
    train_s = time.perf_counter() - started
    model.eval()
    model.save_pretrained(folder)
    ppl, entropy, count = _bloom_heldout(model, heldout, r["seq_len"])
    return {
        "seed": seed,
        "recipe": r,
        "config": {k: cfg.to_dict()[k] for k in ("vocab_size", "hidden_size", "n_layer", "n_head")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": r["steps"],
        "batch": f"{r['batch']} x {r['seq_len']} tokens",
        "tokens_seen": r["steps"] * r["batch"] * r["seq_len"],
        "training_tokens": sum(map(len, paragraphs)),
        "epochs": r["steps"] * r["batch"] * r["seq_len"] / sum(map(len, paragraphs)),
        "lr_schedule": f"AdamW betas (0.9, 0.999), peak {r['lr']}, linear warmup {r['warmup']} steps, cosine to 10%",
        "train_wall_s": train_s,
        "final_train_loss": float(np.mean(losses[-50:])),
        "heldout": {
            "tokens": count,
            "perplexity": ppl,
            "entropy": entropy,
            "log_vocab": math.log(r["vocab_size"]),
            "window": r["seq_len"],
        },
    }


def _t5_config() -> dict[str, Any]:
    """flan-t5-small's config at the small width (untied head, unscaled decoder output, as
    real Flan-T5 files say it: see ../shared/model_configs/README.md)."""
    r = T5
    cfg = config("flan-t5-small") | {
        k: r[k] for k in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers", "num_decoder_layers")
    }
    return cfg | {"dropout_rate": r["dropout"], "tie_word_embeddings": False}


def _save_t5(model: Any, cfg: dict[str, Any], folder: Path) -> None:
    """An untied Flan-T5-style checkpoint: transformers 5 would save it tied, so the state
    (with lm_head.weight) and config are written here, then checked by loading them back."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, T5ForConditionalGeneration

    state = {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).save_pretrained(folder)
    back = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if torch.equal(back.lm_head.weight, back.shared.weight) or not torch.equal(
        back.lm_head.weight, model.lm_head.weight
    ):
        raise RuntimeError("transformers did not load the saved T5 with its own lm_head")
    if getattr(back.config, "scale_decoder_outputs", False):
        raise RuntimeError("transformers loaded the saved T5 with scaled decoder outputs")


def _pad(rows: list[list[int]], value: int) -> Any:
    import torch

    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def _t5_generate(model: Any, tok: Any) -> Callable[[list[str]], list[str]]:
    """transformers' greedy generation as exact_match wants it."""
    import torch

    def generate(sources: list[str]) -> list[str]:
        x = _pad([e.ids for e in tok.encode_batch(sources)], 0)
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=(x != 0).long(),
                max_new_tokens=TASK_MAX_NEW_TOKENS,
                do_sample=False,
                num_beams=1,
            )
        return tok.decode_batch(out.tolist(), skip_special_tokens=True)

    return generate


def _train_t5(folder: Path, seed: int) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    r = T5
    started = time.perf_counter()
    _seed(seed)
    texts = train_paragraphs()
    train_items = task_items("train")
    # a sample of the task's items too, so that every letter alone is one piece ("▁q")
    tok = _train_t5_tokenizer(texts + [src for src, _ in train_items[::20]], r["vocab_size"])
    _save_tokenizer(tok, folder, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    split_letters = [c for c in map(chr, range(97, 123)) if len(tok.encode(c, add_special_tokens=False).ids) != 1]
    if split_letters:
        raise RuntimeError(f"the tokenizer splits letters {split_letters} into several pieces")
    paragraphs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    n_tokens = sum(map(len, paragraphs))
    task = [(tok.encode(s).ids, tok.encode(a).ids) for s, a in train_items]
    _log(
        f"tokenizer: {r['vocab_size']} ids, {n_tokens} training tokens, {len(task)} task items "
        f"(answers up to {max(len(a) for _, a in task)} tokens)",
        started,
    )

    cfg = _t5_config()
    model = T5ForConditionalGeneration(T5Config(**cfg))
    with torch.no_grad():  # an untied head (transformers 5 ties T5's), at tests/reference.py's scale
        model.lm_head.weight = torch.nn.Parameter(torch.randn(r["vocab_size"], r["d_model"]) * r["d_model"] ** -0.5)
    opt, sched = _optimizer(model, r)
    rng = np.random.default_rng(seed)
    windows = _token_windows(paragraphs, r["span_len"], rng)
    order = iter(())
    losses: dict[str, list[float]] = {"span": [], "task": []}
    task_seen = span_tokens = 0
    model.train()
    for step in range(r["steps"]):
        kind = "span" if step % (r["task_every"] + 1) == 0 else "task"
        if kind == "span":
            pairs = [span_corruption(next(windows), rng, r["vocab_size"]) for _ in range(r["span_batch"])]
            span_tokens += r["span_batch"] * r["span_len"]
        else:
            pairs = []
            for _ in range(r["task_batch"]):
                i = next(order, None)
                if i is None:
                    order = iter(rng.permutation(len(task)).tolist())
                    i = next(order)
                pairs.append(task[i])
            task_seen += r["task_batch"]
        x = _pad([s for s, _ in pairs], 0)
        labels = _pad([t for _, t in pairs], -100)
        loss = model(input_ids=x, attention_mask=(x != 0).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[kind].append(loss.item())
        if step % 100 == 99 or step == r["steps"] - 1:
            _log(
                f"step {step + 1}/{r['steps']}: span loss {np.mean(losses['span'][-30:]):.3f}, task loss "
                f"{np.mean(losses['task'][-60:]):.3f}, lr {sched.get_last_lr()[0]:.2e}",
                started,
            )
    train_s = time.perf_counter() - started
    model.eval()
    _save_t5(model, cfg, folder)

    nll = ent = 0.0
    count = 0
    with torch.no_grad():
        for src, dec, tgt in heldout_pairs(folder):
            logits = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0]
            a, b, c = _stats(logits, torch.tensor(tgt))
            nll, ent, count = nll + a, ent + b, count + c
    heldout = task_items("heldout")
    em = exact_match(_t5_generate(model, tok), heldout)
    em_train = exact_match(_t5_generate(model, tok), train_items[:: len(train_items) // 400][:400])
    return {
        "seed": seed,
        "recipe": r,
        "config": {
            k: cfg[k]
            for k in (
                "vocab_size",
                "d_model",
                "d_ff",
                "num_heads",
                "d_kv",
                "num_layers",
                "num_decoder_layers",
                "feed_forward_proj",
                "tie_word_embeddings",
            )
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": r["steps"],
        "batch": f"span corruption {r['span_batch']} x {r['span_len']} tokens, 1 step in {r['task_every'] + 1}; "
        f"task {r['task_batch']} items, the other steps",
        "tokens_seen": {"span_corruption_text": span_tokens, "task_items": task_seen},
        "training_tokens": n_tokens,
        "lr_schedule": f"AdamW betas (0.9, 0.999), peak {r['lr']}, linear warmup {r['warmup']} steps, cosine to 10%",
        "train_wall_s": train_s,
        "final_train_loss": {k: float(np.mean(v[-30:])) for k, v in losses.items()},
        "heldout": {
            "what": "span corruption of the held-out paragraphs (heldout_pairs), teacher-forced",
            "tokens": count,
            "perplexity": math.exp(nll / count),
            "entropy": ent / count,
            "log_vocab": math.log(r["vocab_size"]),
        },
        "task": {
            "what": "sort 5-9 distinct letters: 'sort: q d m a' -> 'a d m q'",
            "heldout_items": len(heldout),
            "exact_match_torch": em,
            "exact_match_torch_train_sample": em_train,
        },
    }


TRAINERS = {"trained-bloom": _train_bloom, "trained-t5": _train_t5}


def ensure(name: str, rebuild: bool = False, seed: int = SEED) -> Path:
    """The checkpoint folder of `name` (trained-bloom, trained-t5), trained first if absent or
    trained on another version of the corpus."""
    if name not in TRAINERS:
        raise ValueError(f"unknown reference model {name!r} (one of {', '.join(NAMES)})")
    folder = TRAINED / name
    if (folder / "training.json").is_file() and not rebuild:
        trained_on = json.loads((folder / "training.json").read_text()).get("corpus_sha256")
        if trained_on == corpus_sha256():
            return folder
        print(f"  {name} was trained on another version of the corpus: training again", flush=True)
    missing = [lang for lang in LANGUAGES if lang not in corpus()]
    if missing:
        print(f"  warning: no corpus for {', '.join(missing)} yet", flush=True)
    tmp = folder.with_name(name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"training {name} (seed {seed})", flush=True)
    started = time.perf_counter()
    info = TRAINERS[name](tmp, seed)
    info["tokenizer"] = tokenizer_report(tmp)
    info["corpus"] = {
        lang: {"train": len(a), "heldout": len(b)} for (lang, a), b in zip(split()[0].items(), split()[1].values())
    }
    info["corpus_sha256"] = corpus_sha256()
    info["wall_s"] = time.perf_counter() - started
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# -- the check: conversion, parity and generation through PocketLM ------------------------------


def _convert(src: Path, out: Path, fmt: str, quant: str) -> None:
    """`python -m pocketlm.converters` in a child process (seconds for these sizes: always afresh)."""
    cmd = [
        sys.executable,
        "-m",
        "pocketlm.converters",
        str(src),
        "-o",
        str(out),
        "--format",
        fmt,
        "--quant",
        quant,
        "--force",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")


def check(name: str) -> dict[str, Any]:
    """Convert to f32 (GGUF, and CTranslate2 float32 for the T5), compare PocketLM's logits with
    transformers' on held-out ids, and (T5) PocketLM's greedy exact match on the task."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import pocketlm

    _seed(SEED)
    folder = ensure(name)
    info = json.loads((folder / "training.json").read_text())
    t5 = name == "trained-t5"
    out_dir = TRAINED / f"{name}-converted"
    out_dir.mkdir(exist_ok=True)
    targets = [("gguf", "f32", out_dir / "f32.gguf")] + ([("ct2", "float32", out_dir / "ct2-float32")] if t5 else [])
    ref = (AutoModelForSeq2SeqLM if t5 else AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32).eval()
    report: dict[str, Any] = {}
    texts = split()[1]
    for fmt, quant, path in targets:
        _convert(folder, path, fmt, quant)
        row: dict[str, Any] = {}
        with pocketlm.load(str(path), threads=THREADS) as model:
            row["backend"] = model.info.backend
            errors = []
            if t5:
                for src, dec, _ in heldout_pairs(folder)[:8]:
                    got = model.logits(src, decoder_input_ids=dec)
                    with torch.no_grad():
                        want = (
                            ref(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0].numpy()
                        )
                    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
            else:
                ids = heldout_ids(folder)
                for lo in range(0, 4 * 256, 256):
                    window = ids[lo : lo + 256]
                    got = model.logits(window)
                    with torch.no_grad():
                        want = ref(input_ids=torch.tensor([window])).logits[0].numpy()
                    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
            row["logits_max_rel_error"] = max(errors)
            ids_match = rt_ok = 0
            from tokenizers import Tokenizer

            hf_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            for paragraphs in texts.values():
                text = paragraphs[0]
                mine = model.tokenize(text)
                theirs = hf_tok.encode(text, add_special_tokens=t5).ids
                ids_match += mine == theirs
                back = model.detokenize([i for i in mine if i != 1] if t5 else mine)
                rt_ok += back == (" ".join(text.split()) if t5 else text)
            row["tokenize_same_ids_as_tokenizers"] = f"{ids_match}/{len(texts)} languages"
            row["detokenize_round_trip"] = f"{rt_ok}/{len(texts)} languages"
            if t5:
                started = time.perf_counter()

                def generate(sources: list[str]) -> list[str]:
                    return [r.text for r in model.generate(sources, max_new_tokens=TASK_MAX_NEW_TOKENS)]

                row["exact_match"] = exact_match(generate, task_items("heldout"))
                row["exact_match_s"] = time.perf_counter() - started
        report[f"{fmt} {quant}"] = row
        print(f"  {name} {fmt} {quant}: {row}", flush=True)
    if t5:
        report["exact_match_torch"] = info["task"]["exact_match_torch"]
    info["check"] = report
    (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return report


def summary(name: str) -> str:
    info = json.loads((TRAINED / name / "training.json").read_text())
    h = info["heldout"]
    line = (
        f"{name}: {info['parameters'] / 1e6:.2f}M parameters, {info['steps']} steps in {info['train_wall_s']:.0f} s; "
        f"held-out perplexity {h['perplexity']:.1f}, entropy {h['entropy']:.2f} of ln V {h['log_vocab']:.2f} "
        f"({h['entropy'] / h['log_vocab']:.0%}); tokenizer unk rate {info['tokenizer']['unk_rate']:.2%}"
    )
    if "task" in info:
        line += f"; task exact match {info['task']['exact_match_torch']:.1%} (torch)"
    return line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="train again even if cached")
    parser.add_argument("--only", choices=("bloom", "t5"), help="one model")
    parser.add_argument("--check", action="store_true", help="convert to f32 and compare PocketLM with transformers")
    args = parser.parse_args(argv)
    names = [f"trained-{args.only}"] if args.only else list(NAMES)
    for name in names:
        ensure(name, args.rebuild)
        if args.check:
            check(name)
    for name in names:
        print(summary(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
