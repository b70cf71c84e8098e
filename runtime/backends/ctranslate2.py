"""The CTranslate2 backend: encoder-decoder models (T5 family) in CTranslate2 folders.

CTranslate2 takes token strings; the converter wrote one unique string per id, so ids map
to strings and back exactly. Decoding runs inside CTranslate2 (`translate_batch` calls back
with each token); teacher-forced logits come from `translate_batch(..., return_logits_vocab=True)`.

Decision table (`decide`):
  CUDA device visible to CTranslate2   cuda, int8_bfloat16 / bfloat16 (T5 overflows in float16)
  CPU                                  int8 for int8 models (else float32), if the build has it
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pocketlm.backends import Backend, register
from pocketlm.converters.core import engine
from pocketlm.converters.core.ct2_file import is_ct2_folder, read_folder_metadata, read_model_bin
from pocketlm.converters.core.errors import ModelLoadError, PocketLMError, RequestError
from pocketlm.core.constraints import fill_masks
from pocketlm.core.engine import BatchEngine, ModelInfo, Seq2Seq
from pocketlm.core.generation import GenerationOptions
from pocketlm.core.sequence import Decoding
from pocketlm.core.text import BytePieces
from pocketlm.core.tokenizer import IncrementalDecoder, load_tokenizer, require

if TYPE_CHECKING:
    from pocketlm.core.constraints import Guide

log = logging.getLogger(__name__)

DEFAULT_MAX_INPUT = 1024


class CT2Engine(Seq2Seq, BatchEngine):
    """A T5-family model in a CTranslate2 folder: CTranslate2 decodes batches by itself."""

    def __init__(
        self,
        folder: Path,
        device: str = "cpu",
        threads: int = 1,
        compute_type: str = "default",
        n_ctx: int | None = None,
        reasons: Sequence[str] = (),
        parallel: int = 1,
    ):
        super().__init__()
        if parallel < 1:
            raise ModelLoadError(f"parallel={parallel}: needs at least 1 sequence")
        self.parallel_sequences = parallel
        # token-by-token decoding (_decode_stepwise): translate_batch calls, sequences in them,
        # tokens chosen, and how many of those were CTranslate2's own guess
        self.stepwise_counts: Counter[str] = Counter()
        ct2 = engine.ctranslate2()
        self._ct2 = ct2
        meta = read_folder_metadata(folder)
        vocab_path = folder / "shared_vocabulary.json"
        try:
            self._vocab: list[str] = json.loads(vocab_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{vocab_path}: unreadable vocabulary ({e})") from None
        self._index = {tok: i for i, tok in enumerate(self._vocab)}
        config = meta.get("ct2_config") or {}
        self.start_token = int(
            meta.get("decoder_start_token_id", self._index.get(config.get("decoder_start_token", "<pad>"), 0))
        )
        self._eos = int(meta.get("eos_token_id", self._index.get(config.get("eos_token", "</s>"), 1)))
        try:
            self._translator = ct2.Translator(
                str(folder),
                device=device,
                compute_type=compute_type,
                inter_threads=1,
                intra_threads=threads,
            )
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{folder}: CTranslate2 could not load this model: {e}") from None
        self._tokenizer = load_tokenizer(folder, meta.get("tokenizer"), len(self._vocab))
        self.info = ModelInfo(
            path=str(folder),
            format="ct2",
            backend="ctranslate2",
            device=device,
            architecture=meta.get("architecture", "unknown"),
            quant=meta.get("quant", "unknown"),
            n_ctx=n_ctx or DEFAULT_MAX_INPUT,
            vocab_size=len(self._vocab),
            threads=threads,
            has_tokenizer=self._tokenizer is not None,
            reasons=[*reasons, f"compute type {self._translator.compute_type}"],
            parallel=parallel,
        )

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return require(self._tokenizer, self.info.path).encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return require(self._tokenizer, self.info.path).decode(ids)

    def detokenizer(self) -> IncrementalDecoder | BytePieces:
        if self._tokenizer is None:
            return BytePieces(lambda token: b"")
        return IncrementalDecoder(self._tokenizer)

    def is_end(self, token: int) -> bool:
        return token == self._eos

    def end_ids(self) -> list[int]:
        return [self._eos]

    def text_tokens(self) -> list[bytes | None]:
        text = self._tokenizer.text_ids() if self._tokenizer is not None else set()
        return [self.token_bytes(i) if i in text else None for i in range(len(self._vocab))]

    def token_bytes(self, token: int) -> bytes:
        if self._tokenizer is None:
            return f"<{token}>".encode()
        return self._vocab[token].replace("\u2581", " ").encode()  # SentencePiece marks a space with U+2581

    def _strings(self, ids: Sequence[int]) -> list[str]:
        return [self._vocab[i] for i in ids]

    # -- evaluation -----------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(decoder_input_ids), vocab]: next-token logits at each decoder position.

        `decoder_input_ids` starts with the decoder start token (default: just that token)."""
        src, dec = self.decoder_ids(input_ids, decoder_input_ids)
        with self.lock:
            return self._logits_unlocked(src, dec)

    def _logits_unlocked(self, src: list[int], dec: list[int]) -> np.ndarray:
        result = self._translator.translate_batch(
            [self._strings(src)],
            target_prefix=[self._strings(dec[1:])],
            beam_size=1,
            return_logits_vocab=True,
            max_decoding_length=len(dec),
            min_decoding_length=0,
            max_input_length=0,
            return_scores=False,
        )[0]
        _check_logits([result])
        return np.stack([np.asarray(row, dtype=np.float32).reshape(-1) for row in result.logits[0]])

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Refused: CTranslate2 4.x gives Python no encoder output (Translator returns tokens,
        scores, attention and logits; ctranslate2.Encoder refuses an encoder-decoder model),
        and recomputing the T5 encoder outside it would be a second implementation to keep
        exact. The same checkpoint converted to GGUF embeds on llama.cpp."""
        raise RequestError(
            "CTranslate2 cannot compute embeddings (it exposes no encoder output): convert the checkpoint to GGUF "
            "(pocketlm convert CHECKPOINT --format gguf) and embed with that file on llama.cpp"
        )

    def continuations_logits(self, context: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """Every candidate teacher-forced in one translate_batch (the source once per entry)."""
        source = self._strings(context)
        with self.lock:
            results = self._translator.translate_batch(
                [source] * len(continuations),
                target_prefix=[self._strings(c[:-1]) for c in continuations],
                beam_size=1,
                return_logits_vocab=True,
                max_decoding_length=max(len(c) for c in continuations),
                min_decoding_length=0,
                max_input_length=0,
                return_scores=False,
            )
        _check_logits(results)
        return [
            np.stack([np.asarray(row, dtype=np.float32).reshape(-1) for row in r.logits[0]])[: len(c)]
            for r, c in zip(results, continuations)
        ]

    @staticmethod
    def _stepwise(options: GenerationOptions) -> bool:
        """Whether PocketLM must choose the tokens itself, with its sampler: seeded sampling
        (CTranslate2 seeds each worker thread's generator once, on first use, so a seed passed
        later changes nothing), OpenAI's presence/frequency penalties, logit_bias and
        constraints (CTranslate2 has none of them)."""
        return (
            (options.seed is not None and not options.greedy)
            or options.penalizes_generated
            or bool(options.logit_bias)
            or options.constrained
        )

    def _decode_stepwise(self, entries: list[_Stepwise]) -> None:
        """Decode sequences whose every token `seq.sampler` chooses, CTranslate2 guessing ahead.

        CTranslate2 has no logits hook, so it decodes greedily (and does no processing of its
        own: no length, repetition or n-gram rule, which are in the sampler's chain) and hands
        each step's token and raw logits to the callback. The sampler chooses the token from
        those logits; while it picks CTranslate2's token, decoding goes on; where it picks
        another, that sequence stops (the callback answers True) and starts again in the next
        call from its tokens so far (`target_prefix`: CTranslate2 re-decodes it one position at
        a time, calling back for each; the callback passes over those and converts only new
        rows). Sequences decode together, each with its own prefix, until every one has ended.
        The tokens are those of the sampler on teacher-forced logits, token by token
        (tests/test_ct2_stepwise.py). A restart costs the encoder and the prefix re-decoded (as
        much as decoding it anew), so the cost grows with how often the sampler leaves argmax
        (benchmarks/control_bench.py). Tokens a constraint forces are appended without a model
        call (`_Stepwise.accept`)."""
        while True:
            live = [e for e in entries if not e.done]
            if not live:
                return
            self._stepwise_call(live)
            for entry in live:
                if not entry.done and not entry.taken:  # no step reached the callback: never expected
                    raise RuntimeError("CTranslate2 returned no new step for a sequence decoded token by token")

    def _stepwise_call(self, live: list[_Stepwise]) -> None:
        """One translate_batch of `_decode_stepwise`: each sequence from its tokens so far until
        it ends or the sampler leaves CTranslate2's path."""
        counts = self.stepwise_counts
        starts = [len(e.decoded) - 1 for e in live]  # each one's first new position
        failure: list[BaseException] = []
        for entry in live:
            entry.taken, entry.diverged = 0, False
        # CTranslate2 4.8 hands the logits of a step, [sequences still decoding, vocab], to the
        # first callback of that step and an empty view to the others; the k-th callback of a
        # step is the k-th sequence still decoding
        step_rows: list[Any] = [None, 0]  # that step's rows, and the next row's index

        def callback(step: Any) -> bool:
            logits = step.logits
            if logits.shape:
                step_rows[:] = [logits, 0]
                guides = [e.guide for e in live if e.guide is not None and not (e.done or e.diverged)]
                if guides:  # a new step: every constrained sequence's mask in one call
                    fill_masks(guides)
            k = step_rows[1]
            step_rows[1] = k + 1
            i = step.batch_id
            entry = live[i]
            if failure or entry.done or entry.diverged:
                return True
            if step.step < starts[i] + entry.taken:
                return False  # a prefix token, forced
            try:
                token = entry.choose(_row(step_rows[0], k))
                entry.taken += 1
                counts["tokens"] += 1
                if token == step.token_id:
                    counts["agreed"] += 1
                else:
                    entry.diverged = True
                entry.accept(token)
            except BaseException as e:  # noqa: BLE001 - raised again once CTranslate2 returns
                failure.append(e)
                return True
            return entry.done or entry.diverged

        counts["calls"] += 1
        counts["sequences"] += len(live)
        self._translator.translate_batch(
            [self._strings(e.seq.ids) for e in live],
            target_prefix=[self._strings(e.decoded[1:]) for e in live],
            max_decoding_length=max(start + e.left for start, e in zip(starts, live)),
            max_input_length=0,
            beam_size=1,
            sampling_topk=1,
            # the callback's logits are taken after CTranslate2's own rules: none of them here
            min_decoding_length=0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            disable_unk=False,
            return_logits_vocab=True,
            return_scores=False,
            callback=callback,
        )
        if failure:
            raise failure[0]

    def _stepwise_entry(self, seq: Decoding, budget: int, emit: Callable[[int], bool]) -> _Stepwise:
        guide = seq.constraint.guide() if seq.constraint is not None else None
        return _Stepwise(seq, budget, emit, self._eos, [self.start_token], guide, done=budget <= 0)

    def _decoding_options(self, options: GenerationOptions, max_new: int) -> dict[str, Any]:
        """CTranslate2's names for the options (it samples inside the engine)."""
        decoding: dict[str, Any] = dict(
            max_decoding_length=max_new,
            min_decoding_length=options.min_new_tokens,
            max_input_length=0,
            repetition_penalty=options.repetition_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
        )
        if options.greedy:
            decoding.update(sampling_topk=1)
        else:
            decoding.update(
                sampling_topk=options.top_k, sampling_topp=options.top_p, sampling_temperature=options.temperature
            )
        return decoding

    # -- decoding (core/scheduler.py BatchScheduler forms the batches) ---------------------------
    def batch_key(self, options: GenerationOptions) -> Hashable | None:
        """Requests decoded in one batch share CTranslate2's decoding options; beams, several
        samples and log-probabilities are decoded whole (`decode_group`), alone."""
        if options.sequences > 1 or options.logprobs is not None:
            return None
        if self._stepwise(options):  # PocketLM's sampler chooses: any such requests decode together
            return ("stepwise",)
        sampling = () if options.greedy else (options.temperature, options.top_k, options.top_p)
        return (options.repetition_penalty, options.min_new_tokens, options.no_repeat_ngram_size, *sampling)

    def decode_group(self, seq: Decoding, budget: int) -> list[tuple[list[int], float | None]]:
        """The token ids (an end token included when produced) and score of each sequence."""
        o = seq.options
        source = self._strings(seq.ids)
        if o.beams and self._stepwise(o):
            raise RequestError(
                "beam search with a constraint, logit_bias or presence/frequency penalties is not available "
                "on CTranslate2 (its beam search takes no per-step rule); use greedy or sampling, or the "
                "model's GGUF on llama.cpp"
            )
        if o.beams:
            # CTranslate2 stops once num_beams hypotheses are finished (transformers'
            # early_stopping=True); "never" goes on to the length budget, where transformers'
            # "never" ends up with the same ones. A length penalty of exactly 0 would make it stop
            # at the first finished top beam instead: 1e-9 keeps its rule and changes no score
            # (float32 length**1e-9 is 1).
            options = self._decoding_options(o, budget)
            results = self._translator.translate_batch(
                [source],
                **options,
                beam_size=o.num_beams,
                num_hypotheses=o.num_return_sequences,
                length_penalty=o.length_penalty or 1e-9,
                patience=float(budget) if o.early_stopping == "never" else 1.0,
                return_scores=True,
                return_end_token=True,
            )[0]
            return [
                ([self._index[t] for t in hyp], float(score)) for hyp, score in zip(results.hypotheses, results.scores)
            ]
        n = o.num_return_sequences
        if self._stepwise(o):  # the samples decode together, each choosing its own tokens
            history = self.penalty_history(seq.ids)
            samples = [seq] + [seq.sibling(i, self.detokenizer(), history) for i in range(1, n)]
            entries = [self._stepwise_entry(d, budget, lambda token: False) for d in samples]
            self._decode_stepwise(entries)
            return [(e.decoded[1:], None) for e in entries]
        copies = 1 if o.greedy else n  # greedy samples are all the same
        results = self._translator.translate_batch(
            [source] * copies,
            **self._decoding_options(o, budget),
            beam_size=1,
            return_end_token=True,
        )
        tokens = [[self._index[t] for t in r.hypotheses[0]] for r in results]
        return [(list(tokens[i % copies]), None) for i in range(n)]

    def decode_batch(self, seqs: list[Decoding], budgets: list[int], on_token: Callable[[int, int], bool]) -> None:
        """Decode several sequences in one translate_batch, each token handed to
        `on_token(index, token)` as it comes; a True answer stops that sequence."""
        options = seqs[0].options
        if self._stepwise(options):  # PocketLM chooses every token (each sequence its own options)
            self._decode_stepwise(
                [
                    self._stepwise_entry(seq, budget, lambda token, i=i: bool(on_token(i, token)))
                    for i, (seq, budget) in enumerate(zip(seqs, budgets))
                ]
            )
            return
        stopped = [False] * len(seqs)
        last: list[int | None] = [None] * len(seqs)

        def callback(step: Any) -> bool:
            i = step.batch_id
            if not stopped[i]:
                last[i] = step.token_id
                stopped[i] = bool(on_token(i, step.token_id))
            return stopped[i]

        results = self._translator.translate_batch(
            [self._strings(seq.ids) for seq in seqs],
            beam_size=1,
            return_end_token=True,
            callback=callback,
            **self._decoding_options(options, max(budgets)),
        )
        for i, result in enumerate(results):  # an end of sequence the callback did not report
            hypothesis = result.hypotheses[0] if result.hypotheses else []
            if not stopped[i] and hypothesis and self._index.get(hypothesis[-1]) == self._eos and last[i] != self._eos:
                on_token(i, self._eos)

    def close(self) -> None:
        translator = getattr(self, "_translator", None)
        if translator is not None:
            translator.unload_model()
            self._translator = None


@dataclass(eq=False)
class _Stepwise:
    """One sequence of CT2Engine._decode_stepwise: `decoded` is the decoder start token and
    the tokens chosen so far; `emit` hands a token out (True: the caller stops the sequence)."""

    seq: Decoding
    budget: int
    emit: Callable[[int], bool]
    end: int
    decoded: list[int]
    guide: Guide | None = None  # where the tokens chosen are in the sequence's constraint
    done: bool = False
    taken: int = 0  # tokens chosen in the current translate_batch call
    diverged: bool = False  # the last one was not CTranslate2's: start again from the prefix

    @property
    def left(self) -> int:
        return self.budget - (len(self.decoded) - 1)

    def choose(self, logits: np.ndarray) -> int:
        """The sampler's token after the tokens so far (its chain sees them as the old path did,
        and the constraint where these tokens are)."""
        return self.seq.sampler(logits, self.decoded, generated=self.decoded[1:], guide=self.guide)

    def accept(self, token: int) -> None:
        """Append a token chosen and hand it out; then those the constraint forces after it,
        without a model call (CTranslate2 then starts again after them)."""
        self._append(token)
        while not self.done and self.guide is not None:
            forced = self.guide.forced()
            if not forced:
                break
            self.diverged = True
            for t in forced:
                self._append(t)
                if self.done:
                    break

    def _append(self, token: int) -> None:
        self.decoded.append(token)
        complete = False
        if self.guide is not None and token != self.end:
            self.guide.advance(token)
            complete = self.guide.stopped  # the constraint is complete: nothing may follow
        if self.emit(token) or token == self.end or self.left <= 0 or complete:
            self.done = True


def _check_logits(results: Sequence[Any]) -> None:
    """CTranslate2 returns no logits at all for a source that is only the end token or padding."""
    if any(not r.logits or not r.logits[0] for r in results):
        raise RequestError("CTranslate2 returns no logits for a source that is only </s> or padding")


def _row(logits: Any, k: int) -> np.ndarray:
    """A float32 copy of row k of a step's logits (the callback's buffer is CTranslate2's)."""
    if str(logits.device) != "cpu":
        logits = logits.to_device(engine.ctranslate2().Device.cpu)
    rows = np.asarray(logits)
    return np.array(rows.reshape(-1, rows.shape[-1])[k], dtype=np.float32)


@dataclass(frozen=True)
class CT2Facts:
    cuda_devices: int = 0  # CUDA devices CTranslate2 can use
    cpu_compute: frozenset[str] = frozenset({"int8", "int8_float32", "float32"})  # its CPU build's types


@register
class CTranslate2(Backend):
    name = "ctranslate2"
    aliases = ("ct2",)
    formats = ("ct2",)
    devices = ("cpu", "cuda")
    package = "ctranslate2"
    priority = 20

    # -- models -----------------------------------------------------------------------------
    def inspect(self, path: Path) -> Any:
        from pocketlm.loading.facts import ModelSource

        if not (path.is_dir() and is_ct2_folder(path)):
            return None
        meta = read_folder_metadata(path)
        return ModelSource(
            path,
            "ct2",
            meta.get("architecture", "t5"),
            meta.get("quant"),
            (path / "model.bin").stat().st_size,
            metadata=meta,
        )

    def describe(self, source: Any) -> dict[str, Any]:
        meta = source.metadata
        try:
            variables, aliases = read_model_bin(source.path / "model.bin")
        except PocketLMError as e:
            raise ModelLoadError(str(e)) from None
        origin = meta.get("source") or {}
        return {
            "parameters": sum(
                math.prod(shape) for name, (_, shape) in variables.items() if not name.endswith("_scale")
            ),
            "tensors": len(variables),
            "tensor_types": dict(Counter(dtype for dtype, _ in variables.values()).most_common()),
            "context_length": None,
            "tokenizer": meta.get("tokenizer") or "none",
            "converter": {"name": meta.get("converter"), "version": meta.get("converter_version")},
            "source": {
                "repo": origin.get("repo"),
                "revision": origin.get("revision"),
                "files": origin.get("files", {}),
            },
            "metadata": {**meta, "aliases": len(aliases)},
        }

    def open(self, source: Any, choice: Any, n_ctx: int | None, **options: Any) -> CT2Engine:
        return CT2Engine(
            source.path,
            device=choice.device,
            threads=choice.threads,
            compute_type=choice.compute_type or "default",
            n_ctx=n_ctx,
            reasons=choice.reasons,
            parallel=choice.parallel,
            **options,
        )

    # -- the machine ------------------------------------------------------------------------
    def probe(self) -> CT2Facts | None:
        try:
            ct2 = engine.ctranslate2()
        except ModelLoadError:
            return None
        try:
            return CT2Facts(int(ct2.get_cuda_device_count()), frozenset(ct2.get_supported_compute_types("cpu")))
        except RuntimeError:
            return CT2Facts(0, frozenset({"float32"}))

    def decide(self, model: Any, facts: Any, device: str, threads: int, reasons: list[str]) -> Any:
        from pocketlm.loading.facts import Choice

        ct2 = facts.engine(self.name) or CT2Facts(0, frozenset({"float32"}))
        quant = model.quant or ""
        if device == "metal":
            raise ModelLoadError("CTranslate2 has no Metal backend; convert the model to GGUF to use the Mac's GPU")
        if device == "cuda" and not ct2.cuda_devices:
            raise ModelLoadError(
                "device 'cuda' requested but CTranslate2 sees no CUDA device (pip install ctranslate2 "
                "ships CUDA support; check the NVIDIA driver and CUDA 12 libraries)"
            )
        if device == "auto":
            device = "cuda" if ct2.cuda_devices else "cpu"
            reasons.append(f"CTranslate2 sees {ct2.cuda_devices} CUDA device(s): {device}")
        else:
            reasons.append(f"device {device} (given)")
        int8 = quant.startswith("int8")
        if device == "cuda":  # T5 overflows in float16 on GPU (a known CTranslate2 issue)
            compute = "int8_bfloat16" if int8 else "bfloat16"
            reasons.append(f"compute {compute}: T5 activations overflow float16")
            return Choice(self.name, device, threads, "ct2", compute_type=compute, reasons=reasons)
        wanted = "int8" if int8 else "int16" if quant == "int16" else "float32"
        compute = wanted if wanted in ct2.cpu_compute else "float32"
        note = f" ({wanted} is not supported by this CPU build)" if compute != wanted else ""
        if (
            compute == "int8"
            and facts.machine in ("x86_64", "AMD64")
            and facts.cpu_features
            and "avx2" not in facts.cpu_features
        ):
            note = " (this CPU lacks AVX2: int8 kernels are slow, but keep 4x less memory)"
        reasons.append(f"compute {compute} on CPU for a {quant or 'unknown'} model{note}")
        return Choice(self.name, device, threads, "ct2", compute_type=compute, reasons=reasons)

    def serving_parallel(self, choice: Any) -> int:
        # flan-t5-small int8, 2 CPU threads, 16 clients (benchmarks/README.md): 3.2x the aggregate
        # tokens/s of one request at a time with 16 per batch, 2.1x with 8, latency alone unchanged
        return 16

    def memory_needed(self, model: Any, choice: Any) -> int:
        quant = choice.quant or model.quant or ""
        if choice.compute_type == "float32" and quant.startswith(("int8", "int16", "float16", "bfloat16")):
            return model.size_bytes * (4 if quant.startswith("int8") else 2)  # weights expand to float32
        return model.size_bytes

    def report(self, facts: CT2Facts | None) -> dict[str, Any]:
        return {
            "ctranslate2 CUDA devices": facts.cuda_devices if facts else 0,
            "ctranslate2 CPU compute types": sorted(facts.cpu_compute) if facts else [],
        }

    def advice(self, facts: Any) -> list[str]:
        ct2 = facts.engine(self.name)
        if ct2 is None:
            return ["CTranslate2 is missing (T5-family models cannot run): pip install ctranslate2"]
        if facts.nvidia_gpu and not ct2.cuda_devices:
            return [
                "an NVIDIA GPU is present but CTranslate2 sees none: install the NVIDIA driver and CUDA 12 "
                "libraries (pip install nvidia-cublas-cu12 nvidia-cudnn-cu12)"
            ]
        return []
