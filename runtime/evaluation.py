"""lm-evaluation-harness on a PocketLM model, in process (the `eval` extra: `pip install 'pocketlm[eval]'`).

    pocketlm eval model.gguf --tasks hellaswag,arc_easy

    import lm_eval, pocketlm.evaluation
    lm_eval.simple_evaluate(model="pocketlm", model_args="pretrained=model.gguf,n_ctx=1024", tasks=[...])

Importing this module imports lm-eval and registers `PocketLM` under the name "pocketlm" (the
rest of pocketlm never imports lm-eval; lm-eval's own `lm_eval` command does not find models of
other packages, hence `pocketlm eval`). Requests are tokenized and windowed as lm-eval's own
`hf` model does, so that scores compare with it:

- loglikelihood: lm-eval's TemplateLM splits context and continuation (a causal model's
  continuation is the whole text's tokens after the context's; an encoder-decoder's is tokenized
  alone, without special tokens). A causal model scores the continuation after the context, an
  encoder-decoder with the context in the encoder and the continuation teacher-forced in the
  decoder. Requests sharing a context go to the engine together (`continuations_logits`: one
  prompt evaluation for a causal model, one batch on CTranslate2).
- loglikelihood_rolling (perplexity): lm-eval's rolling windows over `max_length` tokens, each
  scored as a loglikelihood request (for an encoder-decoder the window's context is the source,
  as `hf` does).
- generate_until: through the model's scheduler (`generate_batch`), `batch_size` prompts at a
  time, greedy unless the task samples, cut at the first stop string as `hf` cuts its output.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval's own models: its registry skips them once it holds any model)
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pocketlm.converters.core.errors import RequestError
from pocketlm.core.engine import Seq2Seq
from pocketlm.core.generation import GenerationOptions
from pocketlm.core.model import Model

__all__ = ["PocketLM"]

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@register_model("pocketlm")
class PocketLM(TemplateLM):
    """A PocketLM model as lm-eval sees it.

    `pretrained`: a loaded `Model`, or what `pocketlm.load` opens (GGUF file, CTranslate2 folder,
    checkpoint folder, hub id), with `load_options` (n_ctx, backend, threads, compute_type, ...)
    passed to it; a model loaded here is closed by `close()`. `batch_size`: generate_until
    prompts decoded together (the model is loaded with as many parallel sequences). `max_length`:
    tokens a request may hold, as `hf`'s (default: the model's context less one, the most the
    engines take with a continuation's last token). `max_gen_toks`: new tokens when a task does
    not say. `prefix_token_id`: what an empty context is (default: BOS, else end of sequence)."""

    def __init__(
        self,
        pretrained: str | Model,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        **load_options: Any,
    ) -> None:
        super().__init__()
        self._batch_size = _batch_size(batch_size, max_batch_size)
        if isinstance(pretrained, Model):
            if load_options or device is not None:
                raise RequestError("load options apply to a path, not to a model already loaded")
            self.model, self._owned = pretrained, False
        else:
            import pocketlm

            if self._batch_size > 1:
                load_options.setdefault("parallel", self._batch_size)
            if device is not None:
                load_options["device"] = device
            self.model, self._owned = pocketlm.load(pretrained, **load_options), True
        info = self.model.info
        if not info.has_tokenizer:
            self.close()
            raise RequestError(f"{info.path} has no tokenizer: lm-eval's tasks are text")
        self.backend = "seq2seq" if isinstance(self.model.engine, Seq2Seq) else "causal"
        self._max_length = int(max_length) if max_length is not None else info.n_ctx - 1
        if not 1 <= self._max_length < info.n_ctx:
            self.close()
            raise RequestError(f"max_length={max_length}: must be 1..{info.n_ctx - 1} (the model's context less one)")
        self._max_gen_toks = int(max_gen_toks)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else self._default_prefix()

    # -- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.engine.end_ids()[0]

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.model.info.path

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' config."""
        info = self.model.info
        return {"pocketlm": {k: v for k, v in info.to_dict().items() if k != "reasons"}}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids (special tokens as it adds them), or without them when
        add_special_tokens is False (a seq2seq continuation: no closing </s>)."""
        return self.model.tokenize(string, add_special=add_special_tokens is not False)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
        """(log-likelihood, greedy) of each (strings, context ids, continuation ids) request."""
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append(i)
        for ctx, members in by_context.items():
            self._check_source(ctx)
            conts = [pairs[i][1] for i in members]
            for i, cont, rows in zip(members, conts, self.model.engine.continuations_logits(list(ctx), conts)):
                out[i] = _scored(rows, cont)
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, window by window as lm-eval's `hf` model does it."""
        scores = []
        for (text,) in (r.args for r in requests):
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(self.tok_encode(text), self._prefix, self._max_length, 1)
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            scores.append(total)
        return scores

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each context's generated text, to its first stop string; requests with the same
        generation kwargs are decoded `batch_size` at a time."""
        args = [r.args for r in requests]
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            gen_kwargs = args[members[0]][1]
            options, until, max_length = self._generation(gen_kwargs)
            for chunk in _chunks(members, self._batch_size):
                prompts = [self._prompt(args[i][0], options.max_new_tokens) for i in chunk]
                if max_length is None:
                    results = self.model.generate_batch(prompts, options)
                else:  # transformers' max_length: a budget per prompt
                    results = [
                        self.model.generate(p, options, max_new_tokens=self._budget(p, max_length)) for p in prompts
                    ]
                for i, result in zip(chunk, results):
                    text = self.model.detokenize([t for t in result.token_ids if not self.model.engine.is_end(t)])
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Close the model if it was loaded here."""
        if self._owned:
            self.model.close()

    # -- helpers ------------------------------------------------------------------------------
    def _default_prefix(self) -> int:
        """lm-eval's `hf`: BOS when the tokenizer has one (a T5 has none), else end of sequence."""
        info = self.model.info
        if self.backend == "causal" and info.format == "gguf":
            from pocketlm.converters.core.gguf_file import read_header

            bos = read_header(info.path).metadata.get("tokenizer.ggml.bos_token_id")
            if bos is not None:
                return int(bos)
        return self.eot_token_id

    def _check_source(self, ctx: Sequence[int]) -> None:
        # CTranslate2 returns no logits for a source that is only the end token: lm-eval's empty
        # context and the first window of a rolling log-likelihood are that (the prefix token).
        if self.model.info.backend == "ctranslate2" and list(ctx) == [self.eot_token_id]:
            raise RequestError(
                "CTranslate2 cannot score a continuation of an empty context (a source that is only </s>): "
                "perplexity tasks and empty contexts need the model as GGUF (llama.cpp)"
            )

    def _fit(self, ctx: list[int], cont: list[int]) -> Pair:
        """Truncated from the left to max_length as `hf` does: a causal model's input is the
        context and the continuation but its last token, an encoder-decoder's each apart."""
        n = self._max_length
        if not cont or len(cont) > n:
            raise RequestError(f"a continuation of {len(cont)} tokens: must be 1..{n} (max_length)")
        if self.backend == "seq2seq":
            return ctx[-n:], cont
        excess = len(ctx) + len(cont) - (n + 1)
        return (ctx[excess:] if excess > 0 else ctx), cont

    def _generation(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationOptions, list[str], int | None]:
        """(options, stop strings, transformers' max_length if given) of a task's generation kwargs."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
        until = [s for s in kwargs.pop("until") if s]
        max_new = int(kwargs.pop("max_gen_toks"))
        max_length = kwargs.pop("max_length", None)
        if not kwargs.pop("do_sample"):
            kwargs["temperature"] = 0.0
        fields = {f.name for f in dataclasses.fields(GenerationOptions)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise RequestError(f"generation kwargs {', '.join(unknown)}: not PocketLM generation options")
        return self.model.options(max_new_tokens=max_new, stop=tuple(until), **kwargs), until, max_length

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, truncated from the left as `hf` does (a causal model keeps room
        for the new tokens); an empty context is the prefix token."""
        ids = self.tok_encode(context) or [self._prefix]
        room = self._max_length - max_new if self.backend == "causal" else self._max_length
        if room < 1:
            raise RequestError(f"max_gen_toks={max_new} leaves no room for the context (max_length {self._max_length})")
        return ids[-room:]

    def _budget(self, prompt: list[int], max_length: int) -> int:
        """New tokens that transformers' max_length leaves (it counts a causal prompt, and an
        encoder-decoder's decoder start token)."""
        used = len(prompt) if self.backend == "causal" else 1
        return max(1, int(max_length) - used)


def _scored(rows: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probabilities, whether each token is the most likely)."""
    logits = np.asarray(rows, dtype=np.float64)[: len(cont)]
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    picked = logits[np.arange(len(cont)), cont]
    return float(np.sum(picked - logz)), bool((logits.argmax(-1) == np.asarray(cont)).all())


def _batch_size(value: int | str | None, cap: int | None) -> int:
    """lm-eval's batch_size: a number, or "auto" (here: 1 unless max_batch_size says more)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return max(1, int(cap or 1))
    try:
        size = int(value)
    except ValueError:
        raise RequestError(f"batch_size={value!r}: a number of requests, or auto") from None
    if size < 1:
        raise RequestError(f"batch_size={value}: at least 1")
    return size


def _chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
