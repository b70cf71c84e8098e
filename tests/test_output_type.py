"""`--output-type`: the output head's tensor type, for convert and quantize (issue 17).

BLOOM's head is its tied token embedding: llama.cpp's quantizer gives it q6_k under K-quants;
the option lets users trade its size against fidelity."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import PocketLMError
from pocketlm.converters.core.gguf_file import read_header
from pocketlm.converters.synthetic import build_random_bloom

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("output-type")
    return build_random_bloom(root / "hf", hidden=256, n_layer=1, n_head=4, vocab_size=512)


def _types(path):
    return {t.name: Q(t.type) for t in read_header(path).tensors}


@pytest.mark.parametrize("quant,output_type,head", [("q4_k_m", "q8_0", Q.Q8_0), ("q8_0", "q4_k", Q.Q4_K)])
def test_convert_gives_the_head_its_type_and_changes_nothing_else(bloom, tmp_path, quant, output_type, head):
    default = _types(convert(bloom, tmp_path / "default.gguf", quant=quant).output)
    out = convert(bloom, tmp_path / "m.gguf", quant=quant, output_type=output_type).output
    types = _types(out)
    assert default["token_embd.weight"] == (Q.Q6_K if quant == "q4_k_m" else Q.Q8_0)  # llama.cpp's choice
    assert types["token_embd.weight"] == head
    assert {k: v for k, v in types.items() if k != "token_embd.weight"} == {
        k: v for k, v in default.items() if k != "token_embd.weight"
    }
    with pocketlm.load(out, threads=2) as model:
        assert len(model.generate([5, 6, 7], max_new_tokens=3, min_new_tokens=3).token_ids) == 3


def test_quantize_command_takes_it(bloom, tmp_path):
    f32 = convert(bloom, tmp_path / "f32.gguf", quant="f32").output
    out = tmp_path / "q.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "pocketlm", "quantize", f32, str(out), "-q", "q4_k_m", "--output-type", "q5_k"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "output q5_k" in proc.stdout
    assert _types(out)["token_embd.weight"] == Q.Q5_K
    bad = subprocess.run(
        [sys.executable, "-m", "pocketlm", "quantize", f32, str(tmp_path / "x.gguf"), "--output-type", "q9"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr


def test_ct2_refuses_it(tmp_path):
    from reference import make_t5

    make_t5(tmp_path / "hf", vocab=64)
    with pytest.raises(PocketLMError, match="GGUF option"):
        convert(tmp_path / "hf", tmp_path / "ct2", format="ct2", output_type="q8_0")
