"""GGUF types written directly while streaming (issue 29): each tensor is read from the
checkpoint, quantized in memory by ggml's own routines into the type llama.cpp's quantizer
would choose for it, and written straight into the output, with no intermediate file.

The reference is llama.cpp itself: `llama_model_quantize` run on PocketLM's full-precision
GGUF of the same checkpoint (f16 when every source tensor is f16, else f32). Every quant
type PocketLM offers, on BLOOM and T5 checkpoints whose rows fit 256-value blocks and whose
rows do not (llama.cpp's fallbacks), shallow and deep (its position rules), f32/f16/bf16
sources, with and without an importance matrix: the two files are the same bytes (tensor
data, tensor types, metadata and layout)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from parity import WIDE
from reference import make_bloom, make_t5, random_ids

from pocketlm.converters import convert
from pocketlm.converters.checkpoint import Checkpoint
from pocketlm.converters.core.errors import PocketLMError
from pocketlm.converters.core.formats import GGUF_QUANTS, TENSOR_TYPES
from pocketlm.converters.gguf_target import full_precision, llama_quantize
from pocketlm.converters.imatrix import ImportanceMatrix, compute
from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

Q = gguf.GGMLQuantizationType

# checkpoints: a tests/parity.py reference config (arch, config), or build arguments
CASES: dict[str, tuple[str, str] | dict] = {
    "bloom-h80": ("bloom", "h80-5heads-safetensors"),  # rows of 80 and 320: every K-quant falls back
    "bloom-f16": ("bloom", "h80-f16-bin"),  # f16 source: an f16 full-precision file
    "bloom-bf16": ("bloom", "h80-bf16"),
    "bloom-wide": ("bloom", WIDE),  # rows of 256
    # 16 blocks: the first sixteenth / eighth and every third block get more bits
    "bloom-deep": dict(build=make_bloom, hidden=256, n_layer=16, n_head=4, vocab=256),
    "t5-tied-scaled": ("t5", "t5-original-relu-tied-scaled"),  # a head with d_model**-0.5 folded in
    "t5-f16": ("t5", "bin-f16"),
    "t5-wide": ("t5", WIDE),
    # f16 with a folded head (rounded to f16 as the full-precision file holds it), 11 encoder
    # blocks padded to the decoder's 12 (enc.blk.10 sorts before enc.blk.2 in llama.cpp's order)
    "t5-deep-f16": dict(
        build=make_t5,
        d_model=256,
        d_kv=32,
        n_heads=4,
        d_ff=256,
        n_layers=11,
        n_dec=12,
        vocab=256,
        head="tied-scaled",
        dtype="f16",
    ),
}
IMATRIX_CASES = ("bloom-h80", "bloom-deep", "t5-f16", "t5-deep-f16")
IMATRIX_QUANTS = [name for name, q in GGUF_QUANTS.items() if q.direct is None]  # the types that read one


class Folders:
    """Each case's checkpoint, its full-precision GGUF and its importance matrix, made once."""

    def __init__(self, checkpoints, root: Path):
        self.checkpoints, self.root = checkpoints, root
        self._made: dict[str, tuple[Path, Path]] = {}
        self._imatrix: dict[str, Path] = {}

    def get(self, case: str) -> tuple[Path, Path]:
        """(checkpoint folder, PocketLM's full-precision GGUF of it)."""
        if case not in self._made:
            spec = CASES[case]
            if isinstance(spec, tuple):
                folder, _ = self.checkpoints.reference(*spec)
                hf = folder / "hf"
            else:
                args = dict(spec)
                hf = self.root / case / "hf"
                args.pop("build")(hf, **args)
            with Checkpoint(hf) as ckpt:
                source = full_precision({ckpt.info(n).dtype for n in ckpt.names()})
            full = self.root / case / "full.gguf"
            full.parent.mkdir(parents=True, exist_ok=True)
            convert(hf, full, quant=source.name.lower(), format="gguf", force=True)
            _check_full_precision(full, source)
            self._made[case] = hf, full
        return self._made[case]

    def imatrix(self, case: str) -> Path:
        """An importance matrix of the case's model over random ids, as a file."""
        if case not in self._imatrix:
            _, full = self.get(case)
            with Checkpoint(self.get(case)[0]) as ckpt:
                vocab = int(ckpt.config["vocab_size"])
            matrix = compute(full, random_ids(256, vocab, seed=7, low=3), dataset="ids", chunk_tokens=64, threads=2)
            self._imatrix[case] = matrix.save(self.root / case / "ids.imatrix.gguf")
        return self._imatrix[case]


@pytest.fixture(scope="module")
def folders(checkpoints, tmp_path_factory):
    return Folders(checkpoints, tmp_path_factory.mktemp("direct-quant"))


def _check_full_precision(path: Path, source: Q) -> None:
    """The reference's premise: the file llama.cpp quantizes holds every matrix in `source`
    and every vector in f32, as PocketLM's intermediate file did."""
    for t in gguf.GGUFReader(path).tensors:
        matrix = sum(d > 1 for d in t.shape) >= 2
        assert t.tensor_type == (source if matrix else Q.F32), t.name


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def _metadata(path: Path) -> list[tuple[str, object]]:
    return [(f.name, f.contents()) for f in gguf.GGUFReader(path).fields.values()]


def assert_same_file(got: Path, want: Path) -> None:
    """The two GGUF files are the same bytes; else say which tensor or key differs first."""
    if got.read_bytes() == want.read_bytes():
        return
    a, b = _tensors(got), _tensors(want)
    assert list(a) == list(b), "tensor sets or order differ"
    for name in b:
        assert a[name][0] == b[name][0], f"{name}: written as {a[name][0]}, llama.cpp {b[name][0]}"
        assert a[name][1] == b[name][1], f"{name}: {a[name][0]} bytes differ from llama.cpp's"
    assert _metadata(got) == _metadata(want)
    pytest.fail("the files differ outside tensor data and metadata (layout)")


@pytest.mark.parametrize("quant", list(GGUF_QUANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_direct_file_is_what_llama_quantize_writes(folders, case, quant, tmp_path):
    hf, full = folders.get(case)
    got = convert(hf, tmp_path / "direct.gguf", quant=quant, format="gguf").output
    want = tmp_path / "llama.gguf"
    llama_quantize(full, want, GGUF_QUANTS[quant].file_type, threads=2)
    assert_same_file(Path(got), want)


@pytest.mark.parametrize("quant", IMATRIX_QUANTS)
@pytest.mark.parametrize("case", IMATRIX_CASES)
def test_with_an_importance_matrix(folders, case, quant, tmp_path):
    hf, full = folders.get(case)
    spec = folders.imatrix(case)
    got = convert(hf, tmp_path / "direct.gguf", quant=quant, format="gguf", imatrix=spec).output
    want = tmp_path / "llama.gguf"
    llama_quantize(full, want, GGUF_QUANTS[quant].file_type, 2, None, ImportanceMatrix.load(spec), spec.name)
    assert_same_file(Path(got), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.gguf", "llama.gguf"]


def test_the_matrix_changes_the_block_matrices(folders, tmp_path):
    """The comparison above is not vacuous: with the matrix, q4_0 quantizes differently (and
    the first eighth of ffn_down becomes q4_1, a rule llama.cpp applies only with a matrix)."""
    hf, _ = folders.get("bloom-deep")
    plain = _tensors(Path(convert(hf, tmp_path / "plain.gguf", quant="q4_0", format="gguf").output))
    guided = _tensors(
        Path(
            convert(
                hf, tmp_path / "guided.gguf", quant="q4_0", format="gguf", imatrix=folders.imatrix("bloom-deep")
            ).output
        )
    )
    changed = {n for n in plain if plain[n] != guided[n]}
    assert changed and all(n.startswith("blk.") for n in changed)
    assert [n for n in guided if guided[n][0] == "Q4_1"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]


def test_calibration_text_matrix_is_computed_on_a_temporary_model(tmp_path):
    """A calibration text needs a runnable model: the full-precision file is written for the
    computation and removed; the kept matrix is the one llama.cpp computes on that file, and
    the output is llama-quantize's with that matrix."""
    tok = train_bloom_tokenizer(SAMPLE_TEXT, 512)
    make_bloom(tmp_path / "hf", hidden=80, n_layer=2, n_head=5, vocab=512, tokenizer=tok)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(SAMPLE_TEXT * 8), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    summary = convert(tmp_path / "hf", out / "m.gguf", quant="q3_k_m", imatrix=text)
    kept = out / "m.imatrix.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf", "m.imatrix.gguf"]  # the temporary model is gone
    full = convert(tmp_path / "hf", tmp_path / "f32.gguf", quant="f32", format="gguf").output
    matrix = ImportanceMatrix.load(kept)
    expected = compute(Path(full), text.read_text(encoding="utf-8"), dataset="calib.txt")
    assert set(matrix.sums) == set(expected.sums) and matrix.chunks == expected.chunks
    for name, sums in expected.sums.items():
        assert (matrix.sums[name] == sums.astype("float32")).all(), name
    want = tmp_path / "llama.gguf"
    llama_quantize(Path(full), want, GGUF_QUANTS["q3_k_m"].file_type, 2, None, matrix, "calib.txt")
    assert_same_file(Path(summary.output), want)


def test_plain_conversion_writes_only_the_output(folders, tmp_path, monkeypatch):
    """No intermediate file: the one GGUF opened for writing is the output's temporary."""
    hf, _ = folders.get("bloom-wide")
    opened = []
    real = gguf.GGUFWriter.write_header_to_file

    def record(self, path=None, *args, **kwargs):
        opened.append(Path(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", record)
    convert(hf, tmp_path / "m.gguf", quant="q4_k_m", format="gguf")
    assert len(opened) == 1 and opened[0].parent == tmp_path and opened[0].name.startswith(".m.gguf")


@pytest.mark.parametrize(
    "case,quant,head",
    [
        ("bloom-wide", "q4_k_m", "q8_0"),  # BLOOM's head is its tied token embedding
        ("bloom-h80", "q4_k_m", "q5_k"),  # ... whose rows of 80 fall back (q5_1)
        ("bloom-wide", "f16", "q6_k"),  # an unquantized file: a tied embedding keeps f16
        ("t5-wide", "q4_k_m", "q8_0"),  # T5's own output.weight
        ("t5-wide", "f16", "q4_k"),
    ],
)
def test_output_type_as_llama_quantize_gives_it(folders, case, quant, head, tmp_path):
    hf, full = folders.get(case)
    got = convert(hf, tmp_path / "direct.gguf", quant=quant, format="gguf", output_type=head).output
    want = tmp_path / "llama.gguf"
    llama_quantize(full, want, GGUF_QUANTS[quant].file_type, 2, TENSOR_TYPES[head])
    assert_same_file(Path(got), want)


def test_output_type_that_cannot_hold_the_rows_is_refused(folders, tmp_path):
    """llama.cpp gives an untied head the --output-type as asked, without a fallback: rows of
    64 cannot be q6_k (llama-quantize fails: "quantized data validation failed"); PocketLM
    says why in one line, before writing anything."""
    hf, _ = folders.get("t5-f16")
    with pytest.raises(PocketLMError, match="output.weight: rows of 64 values cannot be stored as q6_k"):
        convert(hf, tmp_path / "m.gguf", quant="q4_k_m", format="gguf", output_type="q6_k")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["bloom-deep", "t5-deep-f16"])
@pytest.mark.parametrize("quant", ["q3_k_m", "q4_k_m", "q4_k_s"])
def test_deep_cases_reach_the_position_rules(folders, case, quant, tmp_path):
    """The deep cases are there for llama.cpp's rules by position (first blocks, every third
    one): in their files, matrices of one role have different types."""
    hf, _ = folders.get(case)
    out = convert(hf, tmp_path / "m.gguf", quant=quant, format="gguf").output
    types = {n: t for n, (t, _) in _tensors(Path(out)).items()}
    parts = ("ffn_down", "attn_v" if case.startswith("t5") else "attn_qkv")
    assert any(len({t for n, t in types.items() if f".{part}.weight" in n}) > 1 for part in parts)
