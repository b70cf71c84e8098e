"""Importance matrices (issue 17): computed with llama.cpp's `cb_eval`, equal to the squared
inputs transformers feeds each matrix, stored in llama.cpp's imatrix GGUF layout, and used by
`quantize --imatrix` and `convert --imatrix`."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from reference import make_bloom, make_t5, random_ids

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import PocketLMError
from pocketlm.converters.core.formats import FT
from pocketlm.converters.core.gguf_file import read_header
from pocketlm.converters.gguf_target import llama_quantize
from pocketlm.converters.imatrix import ImportanceMatrix, compute
from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

CHUNK = 64
BLOOM_VOCAB = 512


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """(HF folder, transformers' model, f32 GGUF, f16 GGUF): rows of 256, so K-quants apply."""
    root = tmp_path_factory.mktemp("imatrix-bloom")
    tok = train_bloom_tokenizer(SAMPLE_TEXT, BLOOM_VOCAB)
    ref = make_bloom(root / "hf", hidden=256, n_layer=2, n_head=4, vocab=BLOOM_VOCAB, tokenizer=tok)
    f32 = convert(root / "hf", root / "f32.gguf", quant="f32").output
    f16 = convert(root / "hf", root / "f16.gguf", quant="f16").output
    return root / "hf", ref, f32, f16


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(SAMPLE_TEXT * 12), encoding="utf-8")
    return path


def _squared_inputs(model, modules: dict[str, torch.nn.Module], run) -> dict[str, np.ndarray]:
    """Sum over tokens of each listed module's input squared, per column, while `run()` runs."""
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sums


def _assert_close(matrix: ImportanceMatrix, expected: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    assert set(matrix.sums) == set(expected)
    for name, want in expected.items():
        got = matrix.sums[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * float(want.max()), err_msg=name)
        assert matrix.counts[name] == counts[name], name


def test_bloom_matrix_is_the_squared_inputs_transformers_computes(bloom):
    _, ref, f32, _ = bloom
    ids = random_ids(5 * CHUNK + 17, BLOOM_VOCAB, seed=3)  # 5 whole chunks; the rest is left out
    matrix = compute(f32, ids, chunk_tokens=CHUNK, threads=2)
    chunks = [ids[i : i + CHUNK] for i in range(0, 5 * CHUNK, CHUNK)]
    modules = {}
    for i, block in enumerate(ref.transformer.h):
        modules[f"blk.{i}.attn_qkv.weight"] = block.self_attention.query_key_value
        modules[f"blk.{i}.attn_output.weight"] = block.self_attention.dense
        modules[f"blk.{i}.ffn_up.weight"] = block.mlp.dense_h_to_4h
        modules[f"blk.{i}.ffn_down.weight"] = block.mlp.dense_4h_to_h

    def run():
        for c in chunks:
            ref(torch.tensor([c]))

    expected = _squared_inputs(ref, modules, run)
    _assert_close(matrix, expected, dict.fromkeys(modules, 5 * CHUNK))
    assert matrix.chunks == 5 and matrix.chunk_size == CHUNK


def test_t5_matrix_covers_encoder_and_decoder(tmp_path, t5_tokenizer_files):
    ref = make_t5(tmp_path / "hf", d_model=256, d_kv=32, n_heads=4, d_ff=512, n_layers=2, vocab=256)
    f32 = convert(tmp_path / "hf", tmp_path / "t5.gguf", format="gguf", quant="f32").output
    ids = random_ids(3 * CHUNK, 256, seed=4, low=3)
    matrix = compute(f32, ids, chunk_tokens=CHUNK, threads=2)
    half = CHUNK // 2
    pairs = [(ids[i : i + half] + [1], [0] + ids[i + half : i + CHUNK - 1]) for i in range(0, 3 * CHUNK, CHUNK)]
    modules, counts = {}, {}
    for side, blocks, n in (("enc", ref.encoder.block, half + 1), ("dec", ref.decoder.block, half)):
        for i, block in enumerate(blocks):
            layers = block.layer
            attn = layers[0].SelfAttention
            for short, lin in (("q", attn.q), ("k", attn.k), ("v", attn.v), ("o", attn.o)):
                modules[f"{side}.blk.{i}.attn_{short}.weight"] = lin
            if side == "dec":
                cross = layers[1].EncDecAttention
                for short, lin in (("q", cross.q), ("k", cross.k), ("v", cross.v), ("o", cross.o)):
                    name = f"dec.blk.{i}.cross_attn_{short}.weight"
                    modules[name] = lin
                    counts[name] = 3 * (half + 1 if short in ("k", "v") else half)  # k, v read the encoder
            ff = layers[-1].DenseReluDense
            for short, lin in (("gate", ff.wi_0), ("up", ff.wi_1), ("down", ff.wo)):
                modules[f"{side}.blk.{i}.ffn_{short}.weight"] = lin
            for name in modules:
                counts.setdefault(name, 3 * n)

    def run():
        for src, dec in pairs:
            ref(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec]))

    expected = _squared_inputs(ref, modules, run)
    _assert_close(matrix, expected, counts)
    # llama.cpp's quantizer finds every encoder and decoder matrix by name
    out = tmp_path / "t5-q3_k_m.gguf"
    llama_quantize(f32, out, FT.MOSTLY_Q3_K_M, threads=2, imatrix=matrix, imatrix_source="ids")
    assert _meta(out)["quantize.imatrix.entries_count"] == len(matrix.sums)
    with pocketlm.load(out, threads=2) as model:
        assert np.isfinite(model.logits(pairs[0][0], pairs[0][1])).all()


def test_file_is_llama_cpp_imatrix_layout_and_reads_back(bloom, calibration, tmp_path):
    matrix = compute(bloom[3], calibration.read_text(), dataset="calib.txt", chunk_tokens=CHUNK, threads=2)
    path = matrix.save(tmp_path / "m.imatrix.gguf")
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.type"] == "imatrix"
    assert "general.architecture" not in fields
    assert fields["imatrix.datasets"] == ["calib.txt"]
    assert fields["imatrix.chunk_count"] == matrix.chunks > 1
    assert fields["imatrix.chunk_size"] == CHUNK
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{n}.{s}" for n in matrix.sums for s in ("in_sum2", "counts")}
    for name, sums in matrix.sums.items():
        assert tensors[f"{name}.in_sum2"].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensors[f"{name}.in_sum2"].shape) == [len(sums), 1]  # ne0 = columns, ne1 = one matrix
        assert float(tensors[f"{name}.counts"].data.item()) == matrix.counts[name]
    back = ImportanceMatrix.load(path)
    assert back.chunks == matrix.chunks and back.datasets == ["calib.txt"]
    for name in matrix.sums:
        np.testing.assert_array_equal(back.sums[name], matrix.sums[name].astype(np.float32))
        np.testing.assert_allclose(back.means()[name], matrix.sums[name] / matrix.counts[name], rtol=1e-6)


def _tensor_bytes(path):
    reader = gguf.GGUFReader(path)
    return {t.name: bytes(t.data.tobytes()) for t in reader.tensors}


def _meta(path):
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def _quantize(*args):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", "quantize", *map(str, args)], capture_output=True, text=True
    )


def test_quantize_computes_keeps_and_reuses_the_matrix(bloom, calibration, tmp_path):
    f16 = bloom[3]
    plain, guided, again = tmp_path / "plain.gguf", tmp_path / "guided.gguf", tmp_path / "again.gguf"
    assert _quantize(f16, plain, "-q", "q3_k_m").returncode == 0
    proc = _quantize(f16, guided, "-q", "q3_k_m", "--imatrix", calibration)
    assert proc.returncode == 0, proc.stderr
    kept = tmp_path / "guided.imatrix.gguf"
    assert "importance matrix of calib.txt: 8 matrices" in proc.stdout and str(kept) in proc.stdout
    assert ImportanceMatrix.load(kept).datasets == ["calib.txt"]
    meta = _meta(guided)
    assert meta["quantize.imatrix.file"] == "calib.txt"
    assert meta["quantize.imatrix.dataset"] == "calib.txt"
    assert meta["quantize.imatrix.entries_count"] == 8
    assert meta["quantize.imatrix.chunks_count"] == ImportanceMatrix.load(kept).chunks
    assert "quantize.imatrix.file" not in _meta(plain)
    assert meta["pocketlm.quant"] == _meta(plain)["pocketlm.quant"] == "q3_k_m"  # not the f16 source's
    info = subprocess.run([sys.executable, "-m", "pocketlm", "info", str(guided)], capture_output=True, text=True)
    assert "  quant         q3_k_m" in info.stdout
    assert f"  imatrix       calib.txt ({meta['quantize.imatrix.chunks_count']} chunks, 8 matrices)" in info.stdout
    # the matrix changed the block matrices' rounding, and nothing else
    a, b = _tensor_bytes(plain), _tensor_bytes(guided)
    changed = {n for n in a if a[n] != b[n]}
    assert changed and all(n.startswith("blk.") and n.endswith(".weight") for n in changed)
    # a kept matrix is read back, not recomputed: the same file again
    proc = _quantize(f16, again, "-q", "q3_k_m", "--imatrix", kept)
    assert proc.returncode == 0, proc.stderr
    assert "saved as" not in proc.stdout
    assert _tensor_bytes(again) == b
    with pocketlm.load(guided, threads=2) as model:
        assert len(model.generate("Translate to English:", max_new_tokens=4, min_new_tokens=4).token_ids) == 4


def test_convert_takes_it_for_quantizer_types_only(bloom, calibration, tmp_path):
    hf = bloom[0]
    summary = convert(hf, tmp_path / "m-q4_k_m.gguf", quant="q4_k_m", imatrix=calibration)
    kept = tmp_path / "m-q4_k_m.imatrix.gguf"
    assert kept.is_file()
    assert summary.imatrix == f"computed over calib.txt, kept as {kept}"
    assert "importance matrix: computed over calib.txt" in summary.describe()
    assert _meta(summary.output)["quantize.imatrix.file"] == "calib.txt"
    assert read_header(summary.output).tensors
    again = convert(hf, tmp_path / "again.gguf", quant="q4_k_m", imatrix=kept)
    assert again.imatrix == kept.name and _tensor_bytes(again.output) == _tensor_bytes(summary.output)
    with pytest.raises(PocketLMError, match="does not use it"):
        convert(hf, tmp_path / "m-q8_0.gguf", quant="q8_0", imatrix=calibration)
    assert not (tmp_path / "m-q8_0.gguf").exists()


def test_ctranslate2_refuses_it(tmp_path, calibration):
    make_t5(tmp_path / "hf")
    with pytest.raises(PocketLMError, match="--imatrix is a GGUF option"):
        convert(tmp_path / "hf", tmp_path / "ct2", format="ct2", imatrix=calibration)


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda d: d / "missing.txt", "no such file"),
        (lambda d: _write(d / "short.txt", "two words"), "calibration text too short"),
        (lambda d: _write_bytes(d / "bin.txt", b"\xff\xfe\x00binary"), "not UTF-8 text"),
    ],
)
def test_bad_imatrix_input_is_one_line(bloom, tmp_path, make_input, message):
    proc = _quantize(bloom[3], tmp_path / "out.gguf", "-q", "q3_k_m", "--imatrix", make_input(tmp_path))
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.gguf").exists()


def test_a_model_gguf_is_not_an_imatrix(bloom, tmp_path):
    proc = _quantize(bloom[3], tmp_path / "out.gguf", "-q", "q3_k_m", "--imatrix", bloom[2])
    assert proc.returncode != 0
    assert "not an importance matrix" in proc.stderr and "Traceback" not in proc.stderr


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def test_a_folder_with_its_kept_matrix_loads_the_model(bloom, calibration, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert _quantize(bloom[3], folder / "m.gguf", "-q", "q4_k_m", "--imatrix", calibration).returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["m.gguf", "m.imatrix.gguf"]
    with pocketlm.load(folder, threads=2) as model:
        assert model.info.path == str(folder / "m.gguf")
    with pytest.raises(PocketLMError, match="m.imatrix.gguf: an importance matrix, not a model"):
        pocketlm.load(folder / "m.imatrix.gguf", threads=2)
