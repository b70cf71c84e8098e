"""A checkpoint's generation config, as transformers reads it, and where converted models keep it.

transformers takes a model's generation defaults from `generation_config.json`; when a folder
has none, from the generation keys of `config.json` (`GenerationConfig.from_model_config`).
`read()` does the same, and the converters store what it returns unchanged (the raw dict, so a
later PocketLM can apply more of it): GGUF files as JSON text under `GGUF_KEY`, CTranslate2
folders under `METADATA_KEY` in pocketlm.json. The runtime maps it to its options
(`runtime/loading/defaults.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GGUF_KEY = "pocketlm.generation_config"  # a string: the JSON text of the dict
METADATA_KEY = "generation_config"  # in pocketlm.json (CTranslate2 folders) and the provenance dict
FILE = "generation_config.json"

# GenerationConfig's attributes in transformers 5.24 (its __init__), the keys from_model_config
# takes from config.json; transformers_version and _from_model_config are its metadata.
GENERATION_KEYS = frozenset(
    """max_length max_new_tokens min_length min_new_tokens early_stopping max_time stop_strings do_sample
    num_beams use_mtp use_cache cache_implementation cache_config max_cache_len temperature top_k top_p min_p
    top_h typical_p epsilon_cutoff eta_cutoff repetition_penalty encoder_repetition_penalty length_penalty
    no_repeat_ngram_size bad_words_ids renormalize_logits forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens sequence_bias
    token_healing guidance_scale watermarking_config num_return_sequences output_attentions output_hidden_states
    output_scores output_logits return_dict_in_generate pad_token_id bos_token_id eos_token_id
    encoder_no_repeat_ngram_size decoder_start_token_id is_assistant num_assistant_tokens
    num_assistant_tokens_schedule assistant_confidence_threshold prompt_lookup_num_tokens max_matching_ngram_size
    assistant_early_exit assistant_lookbehind target_lookbehind assistant_ensemble_weight speculation_type
    compile_config disable_compile continuous_batching_config low_memory penalty_alpha dola_layers
    diversity_penalty num_beam_groups constraints force_words_ids prefill_chunk_size""".split()
)
DECODER_CONFIGS = ("decoder", "generator", "text_config")  # sub-configs from_model_config also reads


def from_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The generation keys of a config.json, as `GenerationConfig.from_model_config` picks them:
    top-level values that are not null, then, for keys still unset, the first decoder
    sub-config's. Marked `_from_model_config` as transformers marks it."""
    picked = {k: v for k, v in config.items() if k in GENERATION_KEYS and v is not None}
    sub = next((config[name] for name in DECODER_CONFIGS if config.get(name)), None)
    if isinstance(sub, dict):
        picked.update({k: v for k, v in sub.items() if k in GENERATION_KEYS and v is not None and k not in picked})
    return {"_from_model_config": True, **picked} if picked else {}


def read(folder: Path, config: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(generation config, the file it came from, warnings) of a checkpoint folder: its
    generation_config.json, else the generation keys of its config.json (`config`, when
    already read). An unreadable file is a warning, never an error: it only holds defaults."""
    path = Path(folder) / FILE
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            return None, str(path), [f"{path}: unreadable ({type(e).__name__}); its generation defaults are ignored"]
        if not isinstance(found, dict):
            return None, str(path), [f"{path}: not a JSON object; its generation defaults are ignored"]
        return found, str(path), []
    config_path = Path(folder) / "config.json"
    if config is None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None, str(config_path), []  # the converter reports a broken config.json itself
    picked = from_model_config(config) if isinstance(config, dict) else {}
    return picked or None, str(config_path), []
