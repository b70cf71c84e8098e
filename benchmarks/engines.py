"""What runs inside the benchmark child processes: loading each engine, timed generation,
teacher-forced logits, the direct-engine references for the overhead figure, and the bytes
one decoded token must read (the roofline).

Engines are imported inside the functions that use them, so a PocketLM child never imports
torch and a transformers child never imports the runtime: each peak RSS is its own.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from harness import THREADS

from pocketlm.backends.llama_common import extra_buffer_types


@dataclass
class Timing:
    """One generation: time to first token, total time, and token counts."""

    ttft: float
    seconds: float
    prompt_tokens: int
    new_tokens: int

    @property
    def prompt_tps(self) -> float:
        """Prompt processing speed: prompt tokens over the time to the first new token."""
        return self.prompt_tokens / self.ttft if self.ttft > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        rest = self.seconds - self.ttft
        return (self.new_tokens - 1) / rest if self.new_tokens > 1 and rest > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "prompt_tps": self.prompt_tps, "decode_tps": self.decode_tps}


# -- transformers (the baseline) ----------------------------------------------------------


class _FirstTokenTimer:
    """A transformers streamer that only notes when the first new token arrives (generate
    first puts the prompt, or the decoder start token, then each new token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load_transformers(folder: Path, seq2seq: bool) -> Any:
    """transformers' float32 model on CPU with THREADS threads, as a user would load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


class TransformersRunner:
    """transformers' generate, greedy, exactly n new tokens (end of sequence masked until then)."""

    def __init__(self, folder: Path, seq2seq: bool, pad: int = 0):
        self.model = load_transformers(folder, seq2seq)
        self.pad = pad

    @staticmethod
    def _options(n: int) -> dict[str, Any]:
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)

    def generate(self, ids: list[int], n: int) -> Timing:
        import torch

        timer = _FirstTokenTimer()
        x = torch.tensor([ids])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), streamer=timer, **self._options(n)
            )
        seconds = time.perf_counter() - started
        new = out.shape[1] - (1 if self.model.config.is_encoder_decoder else len(ids))
        return Timing((timer.first or time.perf_counter()) - started, seconds, len(ids), int(new))

    def generate_batch(self, prompts: list[list[int]], n: int) -> tuple[float, int]:
        """One padded batch (right padding plus attention mask, as a T5 tokenizer pads):
        (seconds, new tokens)."""
        import torch

        width = max(len(p) for p in prompts)
        x = torch.tensor([p + [self.pad] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=mask, **self._options(n))
        return time.perf_counter() - started, int(out.shape[0] * (out.shape[1] - 1))


def hf_logits(model: Any, ids: Sequence[int], decoder_ids: Sequence[int] | None = None) -> np.ndarray:
    """Teacher-forced float32 logits [positions, vocab] (decoder positions for seq2seq)."""
    import torch

    with torch.inference_mode():
        if decoder_ids is None:
            return model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()
        out = model(input_ids=torch.tensor([list(ids)]), decoder_input_ids=torch.tensor([list(decoder_ids)]))
        return out.logits[0].float().numpy()


# -- PocketLM -------------------------------------------------------------------------------


def load_pocketlm(path: Path, compute_type: str | None = None) -> Any:
    """pocketlm.load with THREADS threads; compute_type only when given (else the runtime picks)."""
    import pocketlm

    options: dict[str, Any] = {"threads": THREADS}
    if compute_type:
        options["compute_type"] = compute_type
    return pocketlm.load(path, **options)


class PocketLMRunner:
    """PocketLM's generate: greedy, exactly n new tokens (min_new_tokens = max_new_tokens)."""

    def __init__(self, path: Path, compute_type: str | None = None):
        self.model = load_pocketlm(path, compute_type)

    def generate(self, ids: list[int], n: int) -> Timing:
        r = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n)
        return Timing(r.first_token_seconds, r.seconds, r.prompt_tokens, len(r.token_ids))

    def generate_batch(self, prompts: list[list[int]], n: int) -> tuple[float, int]:
        """One call with every prompt (CTranslate2 decodes them as one batch): (seconds, new tokens)."""
        started = time.perf_counter()
        results = self.model.generate(prompts, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - started, sum(len(r.token_ids) for r in results)


def compute_type_of(model: Any) -> str | None:
    """The CTranslate2 compute type a loaded PocketLM model runs with (from info.reasons)."""
    for reason in reversed(model.info.reasons):
        if reason.startswith("compute type "):
            return reason.removeprefix("compute type ").strip()
    return None


# -- the engines called directly (runtime overhead) -----------------------------------------


class RawLlama:
    """The least Python one can put around llama.cpp's C API: the context parameters
    PocketLM's backend sets, prompt evaluated with logits for its last token only, then
    greedy argmax over that row and one llama_decode per token."""

    def __init__(self, path: Path, n_ctx: int, threads: int = THREADS, n_batch: int = 512):
        import llama_cpp as llama

        self.llama = llama
        llama.llama_backend_init()
        mparams = llama.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffer_types()  # as the runtime does (AMX faults here)
        self.model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = 1  # GGML_TYPE_F16, as PocketLM for quantized models
        cparams.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_batch = cparams.n_batch
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))

    def _decode(self, ids: Sequence[int], start: int) -> None:
        b = self.batch
        for lo in range(0, len(ids), self.n_batch):
            chunk = ids[lo : lo + self.n_batch]
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + lo + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = lo + i == len(ids) - 1
            b.n_tokens = len(chunk)
            if self.llama.llama_decode(self.ctx, b):
                raise RuntimeError("llama_decode failed")

    def _argmax(self) -> int:
        row = self.llama.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

    def generate(self, ids: list[int], n: int) -> Timing:
        started = time.perf_counter()
        self.llama.llama_memory_clear(self.memory, True)
        self._decode(ids, 0)
        token = self._argmax()
        first = time.perf_counter() - started
        for i in range(1, n):
            self._decode([token], len(ids) + i - 1)
            token = self._argmax()
        return Timing(first, time.perf_counter() - started, len(ids), n)

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)


class HighLevelLlama:
    """llama-cpp-python's `Llama` as its documentation shows it: greedy (temp 0, top_k 1),
    same n_ctx / n_batch / threads, logits_all=False; flash attention on, which is what
    llama.cpp's default ("auto") resolves to on CPU and so what PocketLM's context gets."""

    def __init__(self, path: Path, n_ctx: int, threads: int = THREADS, n_batch: int = 512):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_batch, n_ctx),
            n_ubatch=min(n_batch, n_ctx),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            flash_attn=True,
            verbose=False,
        )

    def generate(self, ids: list[int], n: int) -> Timing:
        started = time.perf_counter()
        first = 0.0
        stream = self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        for i, _ in enumerate(stream):  # Llama.generate never stops by itself: EOS is ignored
            if i == 0:
                first = time.perf_counter() - started
            if i + 1 == n:
                break
        stream.close()
        return Timing(first, time.perf_counter() - started, len(ids), n)

    def close(self) -> None:
        self.llm.close()


class DirectCT2:
    """ctranslate2.Translator called directly, with the options PocketLM passes it."""

    def __init__(self, folder: Path, compute_type: str, threads: int = THREADS):
        import ctranslate2

        self.translator = ctranslate2.Translator(
            str(folder),
            device="cpu",
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=threads,
        )
        self.vocab: list[str] = json.loads((folder / "shared_vocabulary.json").read_text())

    def _options(self, n: int) -> dict[str, Any]:
        return dict(
            max_decoding_length=n, min_decoding_length=n, max_input_length=0, sampling_topk=1, repetition_penalty=1.0
        )

    def generate(self, ids: list[int], n: int) -> Timing:
        started = time.perf_counter()
        first, count = 0.0, 0
        for _ in self.translator.generate_tokens([self.vocab[i] for i in ids], **self._options(n)):
            count += 1
            if count == 1:
                first = time.perf_counter() - started
        return Timing(first, time.perf_counter() - started, len(ids), count)

    def generate_batch(self, prompts: list[list[int]], n: int) -> tuple[float, int]:
        started = time.perf_counter()
        out = self.translator.translate_batch(
            [[self.vocab[i] for i in p] for p in prompts],
            beam_size=1,
            return_end_token=True,
            **self._options(n),
        )
        return time.perf_counter() - started, sum(len(r.hypotheses[0]) for r in out)

    def close(self) -> None:
        self.translator.unload_model()


# -- bytes read per decoded token (the roofline) -------------------------------------------
#
# A decode step multiplies one token's activations by every weight matrix it passes
# through, so it must stream those matrices from memory; for small batches that traffic,
# not arithmetic, bounds the speed. Bytes per token = weights read + caches read:
#   causal (BLOOM):  every tensor of the file. BLOOM ties its output head to the embedding
#     table, so the table is read in full, as the head, each step (the lookup reads one
#     more row); only a model with a separate output.weight reads a single embedding row.
#   seq2seq (T5):    the decoder's tensors + the output head (lm_head, or the tied
#     embedding) + one embedding row, not the encoder (run once per prompt). CTranslate2
#     (and transformers) apply the cross-attention k/v projections once to the encoder
#     output and cache the result; llama.cpp's t5 graph recomputes them from the encoder
#     output at every step, so there they are read (with the encoder output) every step.
#   caches: keys and values of every decoder layer up to the current position (and, where
#     cached, of every source position for cross-attention), at the average position.
# Weight bytes: GGUF files from their tensor table (real quantized sizes); transformers
# 4 bytes per element; CTranslate2 1 byte per element + a float32 scale per row for int8
# compute types, 4 bytes under float32 compute. Vectors (norms, biases) are float32.


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _hf_decode_tensors(shapes: dict[str, tuple[int, ...]], seq2seq: bool) -> tuple[dict[str, tuple[int, ...]], int]:
    """(tensors a decode step reads in full, width of the one embedding row it looks up)."""
    if not seq2seq:  # BLOOM: all of it, the tied embedding as the head
        return shapes, 0
    read = {
        k: s
        for k, s in shapes.items()
        if k.startswith("decoder.")
        and not k.startswith("decoder.embed_tokens")
        and not k.endswith(("EncDecAttention.k.weight", "EncDecAttention.v.weight"))
    }
    head = "lm_head.weight" if "lm_head.weight" in shapes else "shared.weight"
    read[head] = shapes[head]
    return read, shapes["shared.weight"][1]


def hf_decode_weight_bytes(folder: Path, seq2seq: bool, bytes_per_element: float, row_scale_bytes: int = 0) -> int:
    """Weight bytes one decode step reads, for a checkpoint run at `bytes_per_element` per
    matrix element (plus `row_scale_bytes` per matrix row, for per-row int8 scales)."""
    read, row = _hf_decode_tensors(safetensors_shapes(folder), seq2seq)
    total = row * bytes_per_element
    for shape in read.values():
        n = int(np.prod(shape))
        total += n * bytes_per_element + shape[0] * row_scale_bytes if len(shape) >= 2 else n * 4
    return int(total)


def gguf_decode_weight_bytes(path: Path) -> int:
    """Weight bytes one decode step reads from a GGUF file (its real quantized sizes)."""
    from pocketlm.converters.core.gguf_file import read_header

    header = read_header(path)
    tensors = {t.name: t for t in header.tensors}
    embd = tensors["token_embd.weight"]
    row = embd.nbytes // embd.shape[1]
    if header.architecture == "t5":  # llama.cpp reads every decoder tensor, cross k/v included
        head = tensors.get("output.weight", embd)
        return sum(t.nbytes for n, t in tensors.items() if n.startswith("dec.")) + head.nbytes + row
    total = sum(t.nbytes for t in tensors.values())
    return total - embd.nbytes + row if "output.weight" in tensors else total


def cache_bytes(
    cfg: dict[str, Any], seq2seq: bool, position: float, source_len: int, element: int, cross_cached: bool = True
) -> int:
    """Activation bytes a decode step reads at `position`: self-attention keys and values of
    every decoder layer, and for seq2seq either the cached cross-attention keys and values
    (`cross_cached`) or the float32 encoder output the k and v projections are applied to."""
    if not seq2seq:
        return int(2 * cfg["n_layer"] * cfg["hidden_size"] * position * element)
    layers = cfg.get("num_decoder_layers") or cfg["num_layers"]
    width = cfg["num_heads"] * cfg["d_kv"]
    cross = 2 * width * source_len * element if cross_cached else 2 * cfg["d_model"] * source_len * 4
    return int(layers * (2 * width * position * element + cross))
