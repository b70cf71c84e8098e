"""T5-family -> CTranslate2 beyond the parity matrix (tests/test_parity.py runs the configs of
tests/parity.py's REFERENCES["t5"] against transformers): the files written, defaults,
interrupted conversions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parity import WIDE
from reference import make_t5

from pocketlm.converters import convert
from pocketlm.converters.core.ct2_file import read_model_bin
from pocketlm.converters.core.formats import CT2_QUANTS as QUANT_TYPES


@pytest.mark.parametrize("quant", [q for q in QUANT_TYPES if q != "float32"])
def test_quantized_head_types(checkpoints, quant):
    """The output head is stored in the quant's matrix type (int8 with per-row scales)."""
    summary = checkpoints.converted("t5", WIDE, "ct2", quant)  # the model test_parity.py checks quantized
    variables, _ = read_model_bin(Path(summary.output) / "model.bin")
    head_dtype = variables["decoder/projection/weight"][0]
    assert head_dtype == {"int16": "int16", "float16": "float16", "bfloat16": "bfloat16"}.get(quant, "int8")
    if quant == "int8":
        assert "decoder/projection/weight_scale" in variables


def test_tied_embeddings_are_written_once(tmp_path):
    make_t5(tmp_path / "hf", head="tied-scaled", ff="relu")
    convert(tmp_path / "hf", tmp_path / "ct2", quant="int8")
    variables, aliases = read_model_bin(tmp_path / "ct2" / "model.bin")
    assert aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert aliases["encoder/embeddings_0/weight"] == "decoder/embeddings/weight"
    assert "decoder/scale_outputs" in variables
    assert (
        aliases["encoder/layer_1/self_attention/relative_attention_bias"]
        == "encoder/layer_0/self_attention/relative_attention_bias"
    )


def test_default_format_is_ct2_int8_and_metadata_is_written(tmp_path):
    make_t5(tmp_path / "hf", head="untied")
    summary = convert(tmp_path / "hf", tmp_path / "out")
    assert (summary.format, summary.quant) == ("ct2", "int8")
    meta = json.loads((tmp_path / "out" / "pocketlm.json").read_text())
    assert meta["converter"] == "pocketlm" and meta["quant"] == "int8" and meta["architecture"] == "t5"
    assert set(meta["source"]["files"]) >= {"config.json", "model.safetensors"}
    assert (meta["decoder_start_token_id"], meta["eos_token_id"]) == (0, 1)
    assert any("no tokenizer" in w for w in summary.warnings)
    vocab = json.loads((tmp_path / "out" / "shared_vocabulary.json").read_text())
    assert len(vocab) == len(set(vocab)) == 160


def test_interrupted_ct2_conversion_leaves_nothing(tmp_path, monkeypatch):
    import pocketlm.converters.ct2_target as ct2_target

    make_t5(tmp_path / "hf", head="untied")
    calls = {"n": 0}
    real = ct2_target._int8_rows

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(rows)

    monkeypatch.setattr(ct2_target, "_int8_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "hf", tmp_path / "out", quant="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
