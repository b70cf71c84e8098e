"""A model's generation defaults: its checkpoint's generation config, with transformers' meaning.

`generation_defaults()` maps a `generation_config.json` (or, when a checkpoint has none, the
generation keys of its `config.json`, as `GenerationConfig.from_model_config` takes them) to
`GenerationOptions` field names. `load()` puts them in `model.generation_defaults`, where
`Model.options()` uses them under every call's own options; `pocketlm info` shows them.

The rules (transformers 5.24):
- A value equal to transformers' library default is treated as unset (transformers writes only
  what differs; older files repeat its defaults, e.g. `max_length: 20`), and what is unset keeps
  PocketLM's default (`max_new_tokens` 64, not transformers' 20).
- `max_new_tokens` is taken as is, and wins over `max_length`. `max_length` counts the decoder
  start token on an encoder-decoder (so `max_new_tokens = max_length - 1`) but the prompt on a
  causal model: that limit depends on each prompt, and is listed as not applied. Likewise
  `min_new_tokens`, and `min_length` (`min_length - 1` new tokens on an encoder-decoder).
- `temperature`, `top_k` and `top_p` apply only with `do_sample: true`, and then with
  transformers' sampling defaults where unset (1.0, 50, 1.0); otherwise decoding is greedy.
  Beam sampling (`do_sample` with `num_beams` > 1) is not in PocketLM: beam search is kept.
- `num_beams`, `length_penalty`, `early_stopping` (true, false, "never"), `no_repeat_ngram_size`,
  `repetition_penalty` and `num_return_sequences` as they are.
- Keys that change what transformers generates but PocketLM does not do (`typical_p`,
  `forced_bos_token_id`, ...) are listed as not applied; every other key (token ids, cache and
  output flags) is ignored. A value PocketLM cannot use is a one-line warning naming its file,
  and only that value is dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketlm.converters.core import generation_config as stored
from pocketlm.converters.core.errors import GenerationError
from pocketlm.core.generation import GenerationOptions
from pocketlm.loading.facts import HF, ModelSource

# GenerationConfig._get_default_generation_params() in transformers 5.24, for the keys read here
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
}
# what changes the tokens transformers' generate() picks, and PocketLM does not do
NOT_APPLIED = (
    "typical_p",
    "min_p",
    "top_h",
    "epsilon_cutoff",
    "eta_cutoff",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "stop_strings",  # transformers keeps the stop string in the text; PocketLM's `stop` ends before it
    "max_time",
    "num_beam_groups",
    "diversity_penalty",
    "penalty_alpha",
    "constraints",
    "force_words_ids",
    "dola_layers",
    "watermarking_config",
)
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # transformers' values when do_sample is true
# the order values are checked in against GenerationOptions: a value that cannot join those before it is dropped
ORDER = (
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "temperature",
    "top_k",
    "top_p",
    "num_return_sequences",
)


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's generation defaults and where they came from."""

    options: dict[str, Any]  # GenerationOptions field names: what `model.generation_defaults` holds
    source: str  # the file (and key) they were read from
    not_applied: dict[str, Any] = field(default_factory=dict)  # set there, changing transformers' output, not here
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "defaults": dict(self.options),
            "source": self.source,
            "not_applied": dict(self.not_applied),
            "warnings": list(self.warnings),
        }


def _same(value: Any, default: Any) -> bool:
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def _whole(low: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and v >= low


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {  # what transformers accepts, and how to say it is not
    "max_new_tokens": (_whole(1), "is not a whole number >= 1"),
    "max_length": (_whole(1), "is not a whole number >= 1"),
    "min_new_tokens": (_whole(0), "is not a whole number >= 0"),
    "min_length": (_whole(0), "is not a whole number >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "is not true or false"),
    "num_beams": (_whole(1), "is not a whole number >= 1"),
    "num_return_sequences": (_whole(1), "is not a whole number >= 1"),
    "no_repeat_ngram_size": (_whole(0), "is not a whole number >= 0"),
    "length_penalty": (_number, "is not a finite number"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "is not a number > 0"),
    "early_stopping": (lambda v: v in (True, False, "never") and not _number(v), 'is not true, false or "never"'),
    "temperature": (lambda v: _number(v) and v > 0, "is not a number > 0 (do_sample is true)"),
    "top_k": (_whole(0), "is not a whole number >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "is not a number in (0, 1]"),
}


def generation_defaults(
    generation_config: dict[str, Any] | None,
    *,
    model_config: dict[str, Any] | None = None,
    encoder_decoder: bool | None,
    where: str = "generation config",
) -> GenerationDefaults:
    """The defaults a generation config gives, as GenerationOptions field names.

    `generation_config` is a generation_config.json's dict; when there is none (None), the
    generation keys of `model_config` (a config.json) are read instead. `encoder_decoder` says
    how `max_length`/`min_length` count (None, an unknown architecture: they are not applied);
    `where` names the file in warnings."""
    if generation_config is None:
        generation_config = stored.from_model_config(model_config) if isinstance(model_config, dict) else {}
    if not isinstance(generation_config, dict):
        warning = f"{where}: not a JSON object; its generation defaults are ignored"
        return GenerationDefaults({}, where, warnings=(warning,))
    given = {
        k: v
        for k, v in generation_config.items()
        if v is not None and not (k in TRANSFORMERS_DEFAULTS and _same(v, TRANSFORMERS_DEFAULTS[k]))
    }
    warnings: list[str] = []
    out: dict[str, Any] = {}
    not_applied = {k: given[k] for k in NOT_APPLIED if k in given}

    def valid(key: str) -> bool:
        check, reason = CHECKS[key]
        if check(given[key]):
            return True
        warnings.append(f"{where}: {key} {json.dumps(given[key])} {reason}; ignored")
        return False

    for new, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if new in given:  # transformers: the count of new tokens wins over the total
            if valid(new):
                out[new] = given[new]
        elif total in given and valid(total):
            if encoder_decoder:  # the decoder's ids begin with its start token
                out[new] = max(given[total] - 1, 0)
            else:  # a causal model's total counts the prompt: a different limit for every prompt
                not_applied[total] = given[total]
    for key in ("repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping"):
        if key in given and valid(key):
            out[key] = given[key]
    sampling = "do_sample" in given and valid("do_sample") and given["do_sample"]
    if sampling and out.get("num_beams", 1) > 1:
        warnings.append(
            f"{where}: do_sample with num_beams {out['num_beams']} (beam sampling) is not in PocketLM; "
            "beam search without sampling is used"
        )
        sampling = False
    if sampling:
        for key, default in SAMPLING.items():
            if key not in given:
                out[key] = default
            elif valid(key):
                out[key] = given[key]
    if "num_return_sequences" in given and valid("num_return_sequences"):
        n = given["num_return_sequences"]
        if n > 1 and out.get("num_beams", 1) == 1 and not sampling:
            warnings.append(f"{where}: num_return_sequences {n} without beams or sampling (greedy: one); ignored")
        else:
            out["num_return_sequences"] = n
    return GenerationDefaults(_checked(out, where, warnings), where, not_applied, tuple(warnings))


def _checked(options: dict[str, Any], where: str, warnings: list[str]) -> dict[str, Any]:
    """`options` that GenerationOptions accepts together (PocketLM's own limits: beams, ...),
    without those equal to its defaults."""
    base = GenerationOptions()
    kept: dict[str, Any] = {}
    for key in sorted(options, key=ORDER.index):
        try:
            GenerationOptions(**kept, **{key: options[key]})
        except GenerationError as e:
            warnings.append(f"{where}: {key} {json.dumps(options[key])}: {e}; ignored")
            continue
        if not _same(options[key], getattr(base, key)):
            kept[key] = options[key]
    return kept


def _stored(source: ModelSource) -> tuple[Any, str, list[str]] | None:
    """(the generation config a converted model's metadata holds, where, warnings), or None."""
    meta = source.metadata
    if stored.GGUF_KEY in meta:  # GGUF: JSON text
        where = f"{source.path} ({stored.GGUF_KEY})"
        try:
            return json.loads(meta[stored.GGUF_KEY]), where, []
        except (TypeError, ValueError, RecursionError):
            return None, where, [f"{where}: not JSON text; its generation defaults are ignored"]
    if stored.METADATA_KEY in meta and source.path.is_dir():  # a folder's pocketlm.json (CTranslate2)
        return meta[stored.METADATA_KEY], f"{source.path / 'pocketlm.json'} ({stored.METADATA_KEY})", []
    return None


def model_generation_defaults(source: ModelSource, checkpoint: Path | None = None) -> GenerationDefaults | None:
    """The generation defaults of a model on disk: what its metadata holds (as PocketLM's
    converters store it), a checkpoint folder's own files, or, for a model converted from
    `checkpoint` before conversions kept them, that folder's. None when there is nothing."""
    from pocketlm.converters.architectures import get

    arch = get(source.architecture)
    encoder_decoder = arch.encoder_decoder if arch is not None else None
    found = _stored(source) if source.format != HF else None
    folder = source.path if source.format == HF else checkpoint
    if found is None and folder is not None:
        config = source.metadata if source.format == HF else None
        found = stored.read(folder, config)
    if found is None:
        return None
    raw, where, warnings = found
    if raw is None:
        return GenerationDefaults({}, where, warnings=tuple(warnings)) if warnings else None
    defaults = generation_defaults(raw, encoder_decoder=encoder_decoder, where=where)
    return GenerationDefaults(defaults.options, where, defaults.not_applied, (*warnings, *defaults.warnings))
