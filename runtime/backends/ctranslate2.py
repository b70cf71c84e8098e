"""Encoder-decoder models (T5 family) on CTranslate2.

CTranslate2 takes token strings; the converter wrote one unique string per id, so ids map
to strings and back exactly. Decoding runs inside CTranslate2 (`generate_tokens` streams
it); teacher-forced logits come from `translate_batch(..., return_logits_vocab=True)`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from convert import engine
from convert.errors import ModelLoadError

from ..model import GenerationResult, Model, ModelInfo, Seq2Seq, _params
from ..sampling import Sampler, SamplingParams
from ..tokenizer import IncrementalDecoder, load_tokenizer, require

log = logging.getLogger(__name__)

DEFAULT_MAX_INPUT = 1024


def read_folder_metadata(folder: Path) -> dict[str, Any]:
    """pocketlm.json when PocketLM made the folder; else what CTranslate2's config says."""
    meta_path = folder / "pocketlm.json"
    try:
        if meta_path.is_file():
            return json.loads(meta_path.read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}: unreadable model metadata ({e})") from None
    return {"format": "ctranslate2", "architecture": "unknown", "quant": "unknown", "ct2_config": config}


class CT2Seq2SeqModel(Seq2Seq, Model):
    def __init__(
        self,
        folder: Path,
        device: str = "cpu",
        threads: int = 1,
        compute_type: str = "default",
        n_ctx: int | None = None,
        reasons: Sequence[str] = (),
    ):
        super().__init__()
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
        self._start = int(meta.get("decoder_start_token_id", self._index.get(config.get("decoder_start_token", "<pad>"), 0)))
        self._eos = int(meta.get("eos_token_id", self._index.get(config.get("eos_token", "</s>"), 1)))
        try:
            self._translator = ct2.Translator(
                str(folder), device=device, compute_type=compute_type, inter_threads=1, intra_threads=threads,
            )
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{folder}: CTranslate2 could not load this model: {e}") from None
        self._tokenizer = load_tokenizer(folder, meta.get("tokenizer"), self._vocab, self._eos)
        self.info = ModelInfo(
            path=str(folder), format="ct2", backend="ctranslate2", device=device,
            architecture=meta.get("architecture", "unknown"), quant=meta.get("quant", "unknown"),
            n_ctx=n_ctx or DEFAULT_MAX_INPUT, vocab_size=len(self._vocab), threads=threads,
            has_tokenizer=self._tokenizer is not None,
            reasons=[*reasons, f"compute type {self._translator.compute_type}"],
        )

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return require(self._tokenizer, self.info.path).encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return require(self._tokenizer, self.info.path).decode(ids)

    def _detokenizer(self) -> IncrementalDecoder | Any:
        if self._tokenizer is None:
            return _Silent()
        return IncrementalDecoder(self._tokenizer)

    def _is_end(self, token: int) -> bool:
        return token == self._eos

    def _strings(self, ids: Sequence[int]) -> list[str]:
        return [self._vocab[i] for i in ids]

    # -- evaluation -----------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [len(decoder_input_ids), vocab]: next-token logits at each decoder position.

        `decoder_input_ids` starts with the decoder start token (default: just that token)."""
        src, dec = self._decoder_ids(input_ids, decoder_input_ids)
        with self._lock:
            return self._logits_unlocked(src, dec)

    def _logits_unlocked(self, src: list[int], dec: list[int]) -> np.ndarray:
        result = self._translator.translate_batch(
            [self._strings(src)], target_prefix=[self._strings(dec[1:])], beam_size=1,
            return_logits_vocab=True, max_decoding_length=len(dec), min_decoding_length=0,
            max_input_length=0, return_scores=False,
        )[0]
        return np.stack([np.asarray(row, dtype=np.float32).reshape(-1) for row in result.logits[0]])

    def _generate_seeded(self, ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        """Seeded sampling, token by token with PocketLM's sampler.

        CTranslate2 seeds each worker thread's generator once, on first use, so a seed
        passed later changes nothing; for reproducible output the next-token logits are
        recomputed for each step (the prefix re-decoded: slower, but exactly repeatable)."""
        sampler = Sampler(params)
        decoded = [self._start]
        for i in range(max_new):
            banned = [self._eos] if i < params.min_new_tokens else []
            token = sampler(self._logits_unlocked(ids, decoded)[-1], decoded, banned)
            yield token
            if token == self._eos:
                return
            decoded.append(token)

    def _decoding_options(self, params: SamplingParams, max_new: int) -> dict[str, Any]:
        options: dict[str, Any] = dict(
            max_decoding_length=max_new, min_decoding_length=params.min_new_tokens, max_input_length=0,
            repetition_penalty=params.repetition_penalty,
        )
        if params.greedy:
            options.update(sampling_topk=1)
        else:
            options.update(sampling_topk=params.top_k, sampling_topp=params.top_p, sampling_temperature=params.temperature)
        return options

    def _generate_ids(self, ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int]:
        if params.seed is not None and not params.greedy:
            yield from self._generate_seeded(ids, params, max_new)
            return
        options = self._decoding_options(params, max_new)
        produced = 0
        for step in self._translator.generate_tokens(self._strings(ids), **options):
            produced += 1
            yield step.token_id
        if produced < max_new:  # stopped on end of sequence, which CTranslate2 does not yield
            yield self._eos

    def generate_batch(
        self,
        prompts: list[str | Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> list[GenerationResult]:
        """All prompts decoded together by CTranslate2 (one batch), same options as generate()."""
        params = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, min_new_tokens)
        if seed is not None and not params.greedy:  # seeded sampling is token by token (see above)
            return super().generate_batch(
                prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, stop=stop, seed=seed, min_new_tokens=min_new_tokens,
            )
        sources = [self._prompt_ids(p) for p in prompts]
        started = time.perf_counter()
        budget = self._budget(0, max_new_tokens)
        with self._lock:
            if budget <= 0:
                outputs: list[list[int]] = [[] for _ in sources]
            else:
                options = self._decoding_options(params, budget)
                batch = self._translator.translate_batch(
                    [self._strings(ids) for ids in sources], beam_size=1, return_end_token=True, **options,
                )
                outputs = [[self._index[t] for t in r.hypotheses[0]] for r in batch]
        seconds = time.perf_counter() - started
        results = []
        for ids, out in zip(sources, outputs):
            result = GenerationResult("", [], "length", len(ids), seconds=seconds)
            for _ in self._render(out, stop, result, started):
                pass
            results.append(result)
        return results

    def close(self) -> None:
        translator = getattr(self, "_translator", None)
        if translator is not None:
            translator.unload_model()
            self._translator = None


class _Silent:
    def push(self, token: int) -> bytes:
        return b""

    def flush(self) -> bytes:
        return b""
