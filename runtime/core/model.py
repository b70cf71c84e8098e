"""`Model`: what `pocketlm.load()` returns, the same API over every engine.

A Model holds an engine (core/engine.py: llama.cpp, CTranslate2, ...) and the scheduler that
runs its requests (core/scheduler.py). It checks prompts and options where they are given,
so errors come from the call and not from the stream, and builds `generate`, `stream`,
`score` and `logits` on the engine's primitives: sampling, stop sequences, UTF-8 safe
streaming and finish reasons mean the same thing whatever engine runs underneath.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from pocketlm.converters.core.errors import RequestError
from pocketlm.core.constraints import constraint_of
from pocketlm.core.engine import BatchEngine, Embeddings, Engine, ModelInfo, StepEngine
from pocketlm.core.generation import GenerationOptions, GenerationResult, TokenLogprob, TokenStream
from pocketlm.core.scheduler import BatchScheduler, Scheduler
from pocketlm.core.search import log_softmax, token_logprob
from pocketlm.core.sequence import Decoding, Ends

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pocketlm.core.generation import GenerationKwargs

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]  # text, or token ids

__all__ = ["Embeddings", "Model", "ModelInfo", "Prompt"]


class Model:
    """A loaded model. Use `pocketlm.load()` to get one; close it (or use `with`) when done.

    `engine` is what runs it (core/engine.py), `scheduler` what decodes its callers'
    requests, `generation_defaults` the checkpoint's generation_config.json as
    GenerationOptions fields (every call may override them)."""

    def __init__(self, engine: Engine, generation_defaults: dict[str, Any] | None = None):
        self.engine = engine
        self.generation_defaults: dict[str, Any] = dict(generation_defaults or {})
        self._scheduler: Scheduler | None = None
        self._scheduler_creation = threading.Lock()
        self._warned_unterminated = False
        self._added: tuple[list[int], list[int]] | None = None  # special ids tokenize puts (before, after)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def parallel_sequences(self) -> int:
        """Requests decoded together."""
        return self.engine.parallel_sequences

    @property
    def batches_prompts(self) -> bool:
        """Whether several prompts given at once are decoded together (faster than one by one)."""
        return isinstance(self.engine, BatchEngine) or self.engine.parallel_sequences > 1

    @property
    def kv_cells_in_use(self) -> int:
        """KV cells reserved by running sequences (0 when the engine manages its cache)."""
        return self.engine.kv_cells_in_use if isinstance(self.engine, StepEngine) else 0

    @property
    def scheduler(self) -> Scheduler:
        """What decodes this model's requests (created on first use, one per model)."""
        if self._scheduler is None:
            with self._scheduler_creation:
                if self._scheduler is None:
                    engine = self.engine
                    if isinstance(engine, BatchEngine):
                        self._scheduler = BatchScheduler(engine)
                    else:
                        self._scheduler = Scheduler(engine)  # type: ignore[arg-type]
        return self._scheduler

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`, as the Hugging Face tokenizer gives them; `add_special=False`:
        without the special ids it puts around any text (T5: a closing </s>; BLOOM: none)."""
        ids = self.engine.tokenize(text)
        if add_special:
            return ids
        head, tail = self._added_ids()
        if head and ids[: len(head)] == head:
            ids = ids[len(head) :]
        if tail and ids[len(ids) - len(tail) :] == tail:
            ids = ids[: len(ids) - len(tail)]
        return ids

    def _added_ids(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after any text, found once by
        tokenizing an empty text and a letter."""
        if self._added is None:
            empty, letter = self.engine.tokenize(""), self.engine.tokenize("a")
            head = 0
            while head < len(empty) and head < len(letter) and letter[head] == empty[head]:
                head += 1
            tail = empty[head:]
            self._added = (empty[:head], tail if letter[len(letter) - len(tail) :] == tail else [])
        return self._added

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens omitted)."""
        return self.engine.detokenize(ids)

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as it appears inside a text (OpenAI's logprobs show them)."""
        return self.engine.token_bytes(token)

    # -- generation -------------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, /, **given: Any) -> GenerationOptions:
        """The options of a call: `options` when given, else the model's defaults
        (`generation_defaults`); keyword arguments override either."""
        if options is None:
            defaults = dict(self.generation_defaults)
            if given.get("temperature") and "num_beams" not in given:
                defaults.pop("num_beams", None)  # sampling asked for: the default beams give way
                defaults.pop("num_return_sequences", None)
            options = GenerationOptions(**defaults)
        return GenerationOptions.of(options, **given)

    def _check_prompt_end(self, prompt: str) -> None:
        if not self.engine.warn_unterminated_prompts or self._warned_unterminated:
            return
        stripped = prompt.rstrip()
        if stripped and not unicodedata.category(stripped[-1]).startswith("P"):
            self._warned_unterminated = True
            log.warning(
                "the prompt does not end with punctuation; %s models may continue it instead of "
                "answering (end it with '.', '?' or ':' as in the model card's examples)",
                self.info.architecture,
            )

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt, checked against the vocabulary and the context."""
        if isinstance(prompt, str):
            self._check_prompt_end(prompt)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids or (isinstance(prompt, str) and not prompt):
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})")
        if len(ids) >= self.info.n_ctx:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the context holds {self.info.n_ctx} "
                "(load with a larger n_ctx or shorten it)"
            )
        return ids

    def decoding(self, prompt: Prompt, options: GenerationOptions) -> Decoding:
        """A new sequence for `prompt` (checked now)."""
        engine = self.engine
        ids = self.prompt_ids(prompt)
        bad = [t for t, _ in options.logit_bias if t >= self.info.vocab_size]
        if bad:
            last = self.info.vocab_size - 1
            raise RequestError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{last})")
        found = constraint_of(options)
        constraint = engine.vocabulary().constraint(*found) if found is not None else None
        ends = Ends(tuple(engine.end_ids()), engine.is_end)
        return Decoding(ids, options, engine.detokenizer(), engine.penalty_history(ids), ends, 0, constraint)

    def submit(
        self, prompts: Sequence[Prompt], options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> list[TokenStream]:
        """Several prompts submitted together (decoded together as the engine allows): one
        token stream each, in order. Admission counts each prompt as a request of its own."""
        return self._submit(prompts, self.options(options, **kwargs))

    def _submit(self, prompts: Sequence[Prompt], options: GenerationOptions) -> list[TokenStream]:
        scheduler = self.scheduler
        requests = [scheduler.request(self.decoding(p, options), cohort=len(prompts)) for p in prompts]
        return scheduler.submit(requests)

    def stream_tokens(
        self,
        prompt: Prompt,
        options: GenerationOptions | None = None,
        /,
        **kwargs: Unpack[GenerationKwargs],
    ) -> TokenStream:
        """Generate token by token: a stream of each token with the text it releases, whose
        `.result` is the whole GenerationResult once the stream is exhausted. With several
        sequences (samples, beams) each event says which (`index`); beams come at the end."""
        return self._submit([prompt], self.options(options, **kwargs))[0]

    def stream(
        self, prompt: Prompt, options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> Iterator[str]:
        """Text increments; they never split a character and join to `generate().text`."""
        return self.stream_tokens(prompt, options, **kwargs).texts()

    @overload
    def generate(
        self, prompt: Prompt, options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: list[str] | list[Sequence[int]],
        options: GenerationOptions | None = None,
        /,
        **kwargs: Unpack[GenerationKwargs],
    ) -> list[GenerationResult]: ...

    def generate(self, prompt: Any, options: GenerationOptions | None = None, /, **kwargs: Any) -> Any:
        """Complete `prompt` (a string or token ids), or each prompt of a list of them.

        Options (a GenerationOptions, or its fields as keywords; unset ones come from the
        model's `generation_defaults`): max_new_tokens=64, temperature=0.0 (greedy), top_k=0,
        top_p=1.0, repetition_penalty=1.0, presence_penalty=0, frequency_penalty=0, stop=None,
        seed=None, min_new_tokens=0 (end of sequence is not allowed earlier; benchmarks use it
        to decode a fixed length), no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0,
        early_stopping=False, num_return_sequences=1, logprobs=None. Returns a
        GenerationResult (its `.sequences` with num_return_sequences > 1), or a list of them
        for a list of prompts."""
        opts = self.options(options, **kwargs)
        if _is_batch(prompt):
            return self.generate_batch(list(prompt), opts)
        stream = self.stream_tokens(prompt, opts)
        for _ in stream:
            pass
        return stream.result

    def generate_batch(
        self, prompts: list[Prompt], options: GenerationOptions | None = None, /, **kwargs: Unpack[GenerationKwargs]
    ) -> list[GenerationResult]:
        """Complete several prompts, submitted together (decoded together as the engine allows)."""
        streams = self._submit(prompts, self.options(options, **kwargs))
        for stream in streams:
            for _ in stream:
                pass
        return [stream.result for stream in streams]

    # -- scoring ----------------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int], decoder_input_ids: Sequence[int] | None = None) -> np.ndarray:
        """float32 [n, vocab]: next-token logits at every position of `input_ids` (causal), or of
        `decoder_input_ids` (default: the decoder start token) after the source `input_ids`."""
        return self.engine.logits(input_ids, decoder_input_ids)

    def prompt_logprobs(self, input_ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Each token of a prompt after the first with its log-probability under the model
        (log-softmax of the logits before it, teacher-forced) and its `top` most likely
        alternatives: what a completion's `echo` returns. Computed as the engine hands out the
        rows, so a long prompt's logits are never held whole (causal models)."""
        ids = [int(t) for t in input_ids]
        out: list[TokenLogprob] = []

        def take(i: int, row: np.ndarray) -> None:
            if i + 1 < len(ids):
                out.append(token_logprob(log_softmax(row), ids[i + 1], top))

        self.engine.stream_logits(ids, take)
        return out

    def score(self, prompt: str | Sequence[int], candidates: Sequence[str | Sequence[int]]) -> list[float]:
        """Log-likelihood of each candidate answer to `prompt` (zero-shot choice tasks).

        Text candidates are tokenized as the model's tokenizer does (for T5 models that
        includes the closing </s>, as the T0 evaluation scores it)."""
        context = self.prompt_ids(prompt)
        conts = [self.tokenize(c) if isinstance(c, str) else [int(t) for t in c] for c in candidates]
        if any(not cont for cont in conts):
            raise RequestError("a candidate is empty")
        scores = []
        for cont, rows in zip(conts, self.engine.continuations_logits(context, conts)):
            logits = rows.astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            scores.append(float(np.sum(logits[np.arange(len(cont)), cont] - logz)))
        return scores

    # -- embeddings -------------------------------------------------------------------------
    def embed(self, inputs: Sequence[str | Sequence[int]]) -> Embeddings:
        """One L2-normalised vector per input: the mean over its tokens of the model's final
        hidden states. BLOOM: the last layer after `ln_f` (transformers' BloomModel
        last_hidden_state); T5 family: the encoder's output after its final norm
        (T5EncoderModel's). Inputs are evaluated together as the engine allows.

        Each input is a text, tokenized as a prompt is (BLOOM adds no special token; T5 appends
        </s>, as their Hugging Face tokenizers do), or token ids, used as given; a single text
        or id list is one input. An input longer than the context is refused. Only llama.cpp
        computes them (GGUF files): CTranslate2 exposes no encoder output, and refuses saying so.
        Returns Embeddings: `vectors` float32 [n, dim], `tokens` counted over all inputs."""
        if isinstance(inputs, str) or (len(inputs) > 0 and all(isinstance(t, (int, np.integer)) for t in inputs)):
            inputs = [inputs]  # type: ignore[list-item]
        if len(inputs) == 0:
            raise RequestError("no input to embed")
        ids = [self._embedding_ids(i, item) for i, item in enumerate(inputs)]
        means = np.asarray(self.engine.embed(ids), dtype=np.float64)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        vectors = (means / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return Embeddings(vectors, sum(len(t) for t in ids))

    def _embedding_ids(self, index: int, item: str | Sequence[int]) -> list[int]:
        if isinstance(item, str):
            ids = self.tokenize(item) if item else []
        elif isinstance(item, (Sequence, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in item):
            ids = [int(t) for t in item]
        else:
            raise RequestError(f"input {index}: a text or a list of token ids, not {type(item).__name__}")
        if not ids:
            raise RequestError(f"input {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError(
                f"input {index}: token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})"
            )
        if len(ids) > self.info.n_ctx:
            raise RequestError(
                f"input {index} has {len(ids)} tokens; the context holds {self.info.n_ctx} "
                "(load with a larger n_ctx or shorten it)"
            )
        return ids

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the scheduler and free the engine's memory. The model cannot be used afterwards."""
        if self._scheduler is not None:
            self._scheduler.close()
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.architecture} {i.quant} on {i.backend}/{i.device}: {i.path}>"


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (str, list, tuple))
