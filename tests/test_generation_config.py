"""A checkpoint's generation_config.json gives a model's generation defaults, as transformers
reads it; the converters keep it, `load()` applies it, `pocketlm info` shows it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import pytest
from reference import make_t5, random_ids

import pocketlm
from pocketlm.cli.main import main
from pocketlm.converters import convert
from pocketlm.converters.core import generation_config as stored
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.core.generation import GenerationOptions
from pocketlm.loading.defaults import TRANSFORMERS_DEFAULTS, generation_defaults, model_generation_defaults
from pocketlm.loading.source import inspect

FILE_CONFIG = {"num_beams": 2, "no_repeat_ngram_size": 3, "max_new_tokens": 7, "transformers_version": "4.40.0"}
EXPECTED = {"max_new_tokens": 7, "no_repeat_ngram_size": 3, "num_beams": 2}


def seq2seq(config, **kw):
    return generation_defaults(config, encoder_decoder=True, where="g.json", **kw)


def causal(config, **kw):
    return generation_defaults(config, encoder_decoder=False, where="g.json", **kw)


# -- the mapping -------------------------------------------------------------------------


def test_do_sample_false_is_greedy_whatever_the_sampling_values():
    found = causal({"do_sample": False, "temperature": 0.7, "top_k": 10, "top_p": 0.9})
    assert found.options == {} and not found.warnings
    assert GenerationOptions(**found.options).greedy
    assert causal({"temperature": 0.7, "top_p": 0.5}).options == {}  # do_sample unset: transformers' False


def test_do_sample_true_brings_transformers_sampling_defaults():
    assert causal({"do_sample": True}).options == {"temperature": 1.0, "top_k": 50}  # top_p 1.0 is PocketLM's too
    found = causal({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 0})
    assert found.options == {"temperature": 0.6, "top_p": 0.9}  # top_k 0: no limit, PocketLM's default
    assert not GenerationOptions(**found.options).greedy


def test_max_length_counts_the_decoder_start_on_seq2seq_and_the_prompt_on_causal():
    assert seq2seq({"max_length": 50}).options == {"max_new_tokens": 49}
    found = causal({"max_length": 50})
    assert found.options == {} and found.not_applied == {"max_length": 50}
    # max_new_tokens wins over max_length, as in transformers
    assert seq2seq({"max_length": 50, "max_new_tokens": 9}).options == {"max_new_tokens": 9}
    assert causal({"max_length": 50, "max_new_tokens": 9}).not_applied == {}
    assert seq2seq({"min_length": 5}).options == {"min_new_tokens": 4}
    assert causal({"min_length": 5}).not_applied == {"min_length": 5}
    assert causal({"min_new_tokens": 3}).options == {"min_new_tokens": 3}
    # an unknown architecture: how max_length counts is not known
    assert generation_defaults({"max_length": 50}, encoder_decoder=None).not_applied == {"max_length": 50}


def test_transformers_defaults_the_file_repeats_are_not_taken():
    old_style = {"max_length": 20, "min_length": 0, "num_beams": 1, "do_sample": False, "early_stopping": False}
    for found in (seq2seq(old_style), causal(old_style)):
        assert found.options == {} and found.not_applied == {} and not found.warnings
    assert GenerationOptions(**seq2seq(old_style).options).max_new_tokens == 64  # PocketLM's, not 20


def test_search_keys_keep_their_meaning():
    config = {
        "num_beams": 4,
        "length_penalty": 0.6,
        "early_stopping": "never",
        "no_repeat_ngram_size": 3,
        "num_return_sequences": 2,
        "repetition_penalty": 1.2,
    }
    assert seq2seq(config).options == config
    assert seq2seq({"num_beams": 4, "early_stopping": True}).options == {"num_beams": 4, "early_stopping": True}
    GenerationOptions(**seq2seq(config).options)  # valid together


def test_unsupported_and_token_keys():
    found = seq2seq(
        {
            "typical_p": 0.9,
            "forced_bos_token_id": 5,
            "bos_token_id": 0,
            "eos_token_id": [1, 2],
            "use_cache": True,
            "decoder_start_token_id": 0,
            "something_new": 3,
            "epsilon_cutoff": 0.0,  # transformers' default: not listed
        }
    )
    assert found.options == {} and not found.warnings
    assert found.not_applied == {"typical_p": 0.9, "forced_bos_token_id": 5}


@pytest.mark.parametrize(
    "config, key",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2.5}, "num_beams"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"do_sample": True, "temperature": 0}, "temperature"),
        ({"do_sample": True, "top_p": 2}, "top_p"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
        ({"num_beams": 40}, "num_beams"),  # transformers' fine, beyond PocketLM's 16
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 3}, "num_return_sequences"),  # greedy: transformers refuses it too
    ],
)
def test_invalid_values_are_one_line_warnings_naming_the_file(config, key):
    found = seq2seq({**config, "no_repeat_ngram_size": 2})
    assert len(found.warnings) == 1, found.warnings
    warning = found.warnings[0]
    assert warning.startswith("g.json: ") and key in warning and "\n" not in warning
    assert key not in found.options and found.options["no_repeat_ngram_size"] == 2  # only that value is dropped
    GenerationOptions(**found.options)


def test_beam_sampling_keeps_the_beams():
    found = seq2seq({"do_sample": True, "temperature": 0.7, "num_beams": 3})
    assert found.options == {"num_beams": 3} and "beam sampling" in found.warnings[0]


def test_not_an_object():
    found = generation_defaults([1, 2], encoder_decoder=True, where="g.json")
    assert found.options == {} and found.warnings[0].startswith("g.json: not a JSON object")


def test_config_json_when_there_is_no_generation_config():
    config = {
        "architectures": ["T5ForConditionalGeneration"],
        "d_model": 64,
        "num_beams": 4,
        "max_length": 128,
        "task_specific_params": {"summarization": {"num_beams": 2}},  # not read by transformers either
        "decoder": {"no_repeat_ngram_size": 3, "num_beams": 8},  # fills only what the top level leaves unset
        "min_length": None,
    }
    found = generation_defaults(None, model_config=config, encoder_decoder=True)
    assert found.options == {"max_new_tokens": 127, "no_repeat_ngram_size": 3, "num_beams": 4}
    # a generation_config.json, when there is one, is all that counts
    assert generation_defaults({"num_beams": 2}, model_config=config, encoder_decoder=True).options == {"num_beams": 2}


def test_the_keys_are_transformers_own():
    from transformers import GenerationConfig

    attributes = {k for k in vars(GenerationConfig()) if not k.startswith("_")} - {"transformers_version"}
    assert stored.GENERATION_KEYS == attributes
    library = GenerationConfig._get_default_generation_params()
    assert all(library[k] == v for k, v in TRANSFORMERS_DEFAULTS.items())
    config = {"num_beams": 4, "use_cache": True, "vocab_size": 9, "pad_token_id": None, "decoder": {"top_k": 5}}
    theirs = GenerationConfig.from_model_config(dict(config))
    ours = stored.from_model_config(config)
    assert ours.pop("_from_model_config") is True
    assert {k: getattr(theirs, k) for k in stored.GENERATION_KEYS if getattr(theirs, k) is not None} == ours


# -- converters and runtime ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    folder = build_random_bloom(tmp_path_factory.mktemp("gen") / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    (folder / "generation_config.json").write_text(json.dumps(FILE_CONFIG))
    out = folder.parent / "m.gguf"
    summary = convert(folder, out, quant="f32")
    assert not summary.warnings
    return folder, out


@pytest.fixture(scope="module")
def t5_ct2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-t5")
    make_t5(folder / "hf", head="untied")
    (folder / "hf" / "generation_config.json").write_text(json.dumps({**FILE_CONFIG, "decoder_start_token_id": 0}))
    return convert(folder / "hf", folder / "ct2", quant="float32").output


def check_defaults(model, ids):
    assert model.generation_defaults == EXPECTED
    opts = model.options()
    assert (opts.num_beams, opts.no_repeat_ngram_size, opts.max_new_tokens) == (2, 3, 7)
    assert model.options(num_beams=1).num_beams == 1 and model.options(num_beams=1).max_new_tokens == 7
    assert model.options(max_new_tokens=3).max_new_tokens == 3
    assert model.options(GenerationOptions()).num_beams == 1  # whole options given: no defaults
    # the default max_new_tokens, greedily (min_new_tokens: end-of-sequence cannot cut it short)
    result = model.generate(ids, num_beams=1, min_new_tokens=7)
    assert len(result.token_ids) == 7 and result.finish_reason == "length"
    assert len(model.generate(ids, num_beams=1).token_ids) <= 7


def info(path, capsys):
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["generation"]


def test_gguf_keeps_the_generation_config(bloom, capsys):
    _, out = bloom
    reader = gguf.GGUFReader(out)
    field = reader.fields[stored.GGUF_KEY]
    assert json.loads(bytes(field.parts[field.data[0]]).decode()) == FILE_CONFIG  # raw, as the file had it
    with pocketlm.load(out) as model:
        check_defaults(model, model.tokenize("Translate to English: Je t'aime."))
    found = info(out, capsys)
    assert found["defaults"] == EXPECTED and found["source"].startswith(str(out))
    assert main(["info", str(out)]) == 0
    assert "generation    max_new_tokens 7, no_repeat_ngram_size 3, num_beams 2" in capsys.readouterr().out


def test_ct2_keeps_the_generation_config(t5_ct2, capsys):
    folder = Path(t5_ct2)
    meta = json.loads((folder / "pocketlm.json").read_text())
    assert meta[stored.METADATA_KEY] == {**FILE_CONFIG, "decoder_start_token_id": 0}
    with pocketlm.load(folder) as model:
        check_defaults(model, random_ids(6, model.info.vocab_size) + [1])
    assert info(folder, capsys)["defaults"] == EXPECTED


def test_a_checkpoint_folder_is_converted_with_it(bloom, capsys, monkeypatch, tmp_path):
    folder, _ = bloom
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    assert info(folder, capsys) == {
        "defaults": EXPECTED,
        "source": str(folder / "generation_config.json"),
        "not_applied": {},
        "warnings": [],
    }
    with pocketlm.load(folder) as model:
        assert model.generation_defaults == EXPECTED
        assert model.info.format == "gguf"


def test_a_conversion_made_before_it_reads_the_checkpoint(bloom):
    folder, out = bloom
    source = inspect(out)
    old = dataclasses.replace(source, metadata={k: v for k, v in source.metadata.items() if k != stored.GGUF_KEY})
    assert model_generation_defaults(old) is None
    assert model_generation_defaults(old, checkpoint=folder).options == EXPECTED


def test_config_json_keys_are_kept_when_there_is_no_generation_config(tmp_path, capsys):
    folder = build_random_bloom(tmp_path / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3, "max_length": 40}))
    out = convert(folder, tmp_path / "m.gguf", quant="f32").output
    found = info(out, capsys)
    assert found["defaults"] == {"repetition_penalty": 1.3}
    assert found["not_applied"] == {"max_length": 40}  # a causal model's max_length counts the prompt


def test_a_broken_generation_config_is_a_warning(tmp_path, caplog):
    folder = build_random_bloom(tmp_path / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    (folder / "generation_config.json").write_text("{not json")
    summary = convert(folder, tmp_path / "m.gguf", quant="f32")
    assert any("generation_config.json: unreadable" in w for w in summary.warnings)
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": -3, "max_new_tokens": 5}))
    out = convert(folder, tmp_path / "n.gguf", quant="f32").output
    with caplog.at_level("WARNING"), pocketlm.load(out) as model:
        assert model.generation_defaults == {"max_new_tokens": 5}
    assert [r.getMessage() for r in caplog.records if "num_beams" in r.getMessage()] == [
        f"{out} ({stored.GGUF_KEY}): num_beams -3 is not a whole number >= 1; ignored"
    ]
