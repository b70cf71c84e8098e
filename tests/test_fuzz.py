"""Fuzzing the parsers of untrusted files: every bad input is a domain error, nothing else.

safetensors headers, torch pickles, index/config JSON and GGUF headers are fed truncated,
oversized, negative, overlapping, wrongly-typed, huge and NaN-laden variants. A parser may
accept an input (then reading it must work) or raise its domain error; any other exception,
a hang (hypothesis' deadline) or code execution fails the test.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketlm.converters.checkpoint import Checkpoint, SafetensorsFile, write_safetensors
from pocketlm.converters.core.errors import CheckpointError, ModelLoadError, PocketLMError, UnsafePickleError
from pocketlm.converters.core.gguf_file import read_header
from pocketlm.converters.torch_pickle import TorchZipFile

# POCKETLM_FUZZ_EXAMPLES=5000 for a longer hunt than the suite's default
FUZZ = settings(
    max_examples=int(os.environ.get("POCKETLM_FUZZ_EXAMPLES", 150)),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- safetensors ----------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 7, 2**31, 2**63, -1]),
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "", "f32"]), numbers),
        "shape": st.one_of(st.lists(numbers, max_size=5), numbers, st.text(max_size=3)),
        "data_offsets": st.one_of(st.lists(numbers, max_size=3), numbers, st.none()),
    },
)
headers = st.dictionaries(
    st.text(min_size=1, max_size=8), st.one_of(entries, numbers, st.text(max_size=4), st.none()), max_size=4
)


def _damaged(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """`data` cut to `cut` bytes, then with the (position, value) overwrites that still fit."""
    out = bytearray(data[:cut])
    for pos, value in flips:
        if pos < len(out):
            out[pos] = value
    return bytes(out)


def _safetensors_bytes(header: object, data: bytes) -> bytes:
    blob = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _read_all(f: SafetensorsFile) -> None:
    for name in f.names():
        arr = f.array(name)
        assert arr.nbytes == np.asarray(arr).nbytes


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_safetensors_random_headers(tmp_path, header, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    try:
        _read_all(SafetensorsFile(path))
    except CheckpointError:
        pass


@pytest.fixture(scope="module")
def valid_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "ok.safetensors"
    write_safetensors(path, {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)})
    return path.read_bytes()


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
)
def test_safetensors_truncated_and_corrupted(tmp_path, valid_safetensors, cut, flips):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_damaged(valid_safetensors, cut, flips))
    try:
        _read_all(SafetensorsFile(path))
    except CheckpointError:
        pass


def test_safetensors_named_attacks(tmp_path):
    cases = {
        "negative-offset": {"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
        "overlap": {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        "huge-shape": {"t": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}},
        "nan-shape": {"t": {"dtype": "F32", "shape": [float("nan")], "data_offsets": [0, 4]}},
        "wrong-dtype": {"t": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
        "past-end": {"t": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}},
    }
    for name, header in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(_safetensors_bytes(header, b"\0" * 16))
        with pytest.raises(CheckpointError):
            SafetensorsFile(path)
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000)
    with pytest.raises(CheckpointError):
        SafetensorsFile(deep)


# -- torch pickles ----------------------------------------------------------------------------


def _torch_zip(payload: bytes | None = None, obj: object = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buf)
    buf.seek(0)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = payload if payload is not None else pickle.dumps(obj, protocol=2)
            dst.writestr(item, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def valid_pickle():
    with zipfile.ZipFile(io.BytesIO(_torch_zip(obj=None))) as z:
        pass
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=8), cut=st.integers(0, 300)
)
def test_pickle_bytes_corrupted(tmp_path, valid_pickle, flips, cut):
    path = tmp_path / "x.bin"
    path.write_bytes(_torch_zip(payload=_damaged(valid_pickle, cut, flips)))
    try:
        f = TorchZipFile(path)
        for name in f.tensors:
            np.asarray(f.array(name))
    except CheckpointError:  # UnsafePickleError is one
        pass


class _Call:
    def __init__(self, module: str, name: str, args: tuple):
        self.module, self.name, self.args = module, name, args

    def __reduce__(self):
        import importlib

        try:
            target = getattr(importlib.import_module(self.module), self.name)
        except (ImportError, AttributeError):
            target = print
        return (target, self.args)


FORBIDDEN = [
    ("os", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("torch.serialization", "load"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_from_type_v2"),
    ("torch.nn.modules.module", "Module"),
    ("collections", "defaultdict"),
    ("numpy", "load"),
]


@pytest.mark.parametrize("module,name", FORBIDDEN, ids=[f"{m}.{n}" for m, n in FORBIDDEN])
def test_pickle_globals_outside_the_allow_list_are_refused_and_logged(tmp_path, caplog, module, name):
    marker = tmp_path / "ran"
    path = tmp_path / "x.bin"
    path.write_bytes(_torch_zip(obj={"w": _Call(module, name, (f"touch {marker}",))}))
    with caplog.at_level(logging.WARNING, logger="pocketlm.converters.torch_pickle"), pytest.raises(UnsafePickleError):
        TorchZipFile(path)
    assert not marker.exists()
    assert any("refused pickle global" in r.getMessage() for r in caplog.records)


# -- index and config JSON ---------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    from pocketlm.converters.synthetic import build_random_bloom

    return build_random_bloom(tmp_path_factory.mktemp("cfg") / "hf", hidden=32, n_layer=1, n_head=2, vocab_size=300)


@FUZZ
@given(
    patch=st.dictionaries(
        st.sampled_from(
            [
                "hidden_size",
                "n_layer",
                "n_head",
                "vocab_size",
                "layer_norm_epsilon",
                "architectures",
                "model_type",
                "tie_word_embeddings",
                "apply_residual_connection_post_layernorm",
                "eos_token_id",
            ]
        ),
        json_values,
        max_size=4,
    )
)
def test_config_values_of_any_type(tmp_path, bloom_dir, patch):
    from pocketlm.converters import convert

    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    for f in bloom_dir.iterdir():
        target = folder / f.name
        if not target.exists():
            target.symlink_to(f)
    config = json.loads((bloom_dir / "config.json").read_text())
    config.update(patch)
    (folder / "config.json").unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps(config, allow_nan=True))
    out = tmp_path / "out.gguf"
    try:
        convert(folder, out, quant="f16", force=True)
    except PocketLMError:
        pass


@FUZZ
@given(index=json_values)
def test_index_files_of_any_shape(tmp_path, index):
    folder = tmp_path / "idx"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, allow_nan=True))
    try:
        Checkpoint(folder)
    except CheckpointError:
        pass


# -- GGUF headers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory, bloom_dir):
    from pocketlm.converters import convert

    out = tmp_path_factory.mktemp("g") / "m.gguf"
    convert(bloom_dir, out, quant="q8_0")
    return out.read_bytes()


@FUZZ
@given(cut=st.integers(0, 200_000), flips=st.lists(st.tuples(st.integers(0, 60_000), st.integers(0, 255)), max_size=8))
def test_gguf_truncated_and_corrupted(tmp_path, valid_gguf, cut, flips):
    data = _damaged(valid_gguf, cut, flips)
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    try:
        header = read_header(path)
    except ModelLoadError:
        return
    for t in header.tensors:  # accepted: every tensor lies inside the file
        assert t.offset + t.nbytes <= len(data)


def test_gguf_named_attacks(tmp_path, valid_gguf):
    def patched(offset: int, fmt: str, value: int) -> Path:
        data = bytearray(valid_gguf)
        struct.pack_into(fmt, data, offset, value)
        path = tmp_path / f"p{offset}.gguf"
        path.write_bytes(bytes(data))
        return path

    for path in (patched(4, "<I", 99), patched(8, "<Q", 2**60), patched(16, "<Q", 2**60), patched(24, "<Q", 2**62)):
        with pytest.raises(ModelLoadError):
            read_header(path)


def test_pickle_memo_index_cannot_force_a_huge_allocation(tmp_path):
    import resource
    import time

    forged = b"\x80\x02}r\xf0\xff\xff\xff."  # PROTO 2, EMPTY_DICT, LONG_BINPUT 4294967280, STOP
    path = tmp_path / "x.bin"
    path.write_bytes(_torch_zip(payload=forged))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    f = TorchZipFile(path)  # an empty state dict: harmless once read
    assert f.tensors == {}
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


# -- SentencePiece models -------------------------------------------------------------------


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 4000),
)
def test_spiece_model_corrupted(tmp_path, t5_tokenizer_files, flips, cut):
    """A damaged spiece.model is read or refused with PocketLM's error, and what is read
    either builds a tokenizer or is refused the same way: never another exception."""
    from pocketlm.converters.core.errors import UnsupportedModelError
    from pocketlm.converters.core.sentencepiece import read_spm_model, t5_tokenizer

    data = t5_tokenizer_files["spiece.model"].read_bytes()
    path = tmp_path / "spiece.model"
    path.write_bytes(_damaged(data, len(data) - cut % len(data) if cut else len(data), flips))
    try:
        spm = read_spm_model(path)
        t5_tokenizer(spm, len(spm.pieces) + 100, str(path)).encode("Translate to English: Je t'aime.")
    except UnsupportedModelError:
        pass
