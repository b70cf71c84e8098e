"""Split GGUF output (issue 29): `--split-max-size` / `--split-max-tensors` write llama.cpp's
split files, which llama.cpp (through PocketLM) loads by the first file, giving the unsplit
file's logits; the split keys are gguf-split's; an older split of the same name is replaced
whole or refused."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from reference import make_t5

import pocketlm
from pocketlm.converters.core.errors import PocketLMError
from pocketlm.converters.synthetic import build_random_bloom

IDS = list(range(10, 42))


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bloom")
    return build_random_bloom(folder / "hf", hidden=64, n_layer=4, n_head=4, vocab_size=512, std=0.2)


def shards(folder, stem):
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def split_keys(path):
    fields = gguf.GGUFReader(path).fields
    return tuple(int(fields[k].parts[-1][0]) for k in ("split.no", "split.count", "split.tensors.count"))


def tensor_bytes(paths):
    out = {}
    for path in paths:
        for t in gguf.GGUFReader(path).tensors:
            out[t.name] = (int(t.tensor_type), bytes(t.data.tobytes()))
    return out


@pytest.mark.parametrize("quant, limit", [("f32", {"split_max_tensors": 12}), ("q4_k_m", {"split_max_size": 60_000})])
def test_split_files_load_by_their_first_file_with_the_unsplit_logits(bloom, tmp_path, quant, limit):
    whole = pocketlm.convert(bloom, tmp_path / "whole.gguf", quant=quant)
    split = pocketlm.convert(bloom, tmp_path / "m.gguf", quant=quant, **limit)
    files = shards(tmp_path, "m")
    assert len(files) >= 3 and split.output == str(files[0]) and not (tmp_path / "m.gguf").exists()
    assert [p.name for p in files] == [f"m-{i:05d}-of-{len(files):05d}.gguf" for i in range(1, len(files) + 1)]
    total = len(gguf.GGUFReader(whole.output).tensors)
    assert [split_keys(p) for p in files] == [(i, len(files), total) for i in range(len(files))]
    readers = [gguf.GGUFReader(p) for p in files]
    assert "general.architecture" in readers[0].fields and all(
        "general.architecture" not in r.fields for r in readers[1:]
    )
    if "split_max_tensors" in limit:
        assert all(len(r.tensors) <= limit["split_max_tensors"] for r in readers)
    else:  # a file goes over the size only with its first tensor
        assert all(sum(int(t.n_bytes) for t in r.tensors[:-1]) <= limit["split_max_size"] for r in readers)
    assert tensor_bytes(files) == tensor_bytes([whole.output])  # the same tensors, only placed in files
    assert split.size_bytes == sum(p.stat().st_size for p in files)
    with pocketlm.load(whole.output) as a, pocketlm.load(split.output) as b:
        np.testing.assert_array_equal(a.logits(IDS), b.logits(IDS))


def test_t5_split_loads_with_the_unsplit_logits(tmp_path):
    make_t5(tmp_path / "hf", vocab=300)
    hf = tmp_path / "hf"
    whole = pocketlm.convert(hf, tmp_path / "whole.gguf", format="gguf", quant="f32")
    split = pocketlm.convert(hf, tmp_path / "t5.gguf", format="gguf", quant="f32", split_max_tensors=10)
    assert len(shards(tmp_path, "t5")) >= 3
    with pocketlm.load(whole.output) as a, pocketlm.load(split.output) as b:
        np.testing.assert_array_equal(a.logits(IDS[:8], [0, 5, 6]), b.logits(IDS[:8], [0, 5, 6]))


def test_an_older_split_is_refused_or_replaced_whole(bloom, tmp_path):
    first = pocketlm.convert(bloom, tmp_path / "m.gguf", quant="f32", split_max_tensors=8)
    older = shards(tmp_path, "m")
    with pytest.raises(PocketLMError, match="already exists"):
        pocketlm.convert(bloom, tmp_path / "m.gguf", quant="f32", split_max_tensors=20)
    assert shards(tmp_path, "m") == older and first.output == str(older[0])
    pocketlm.convert(bloom, tmp_path / "m.gguf", quant="f32", split_max_tensors=20, force=True)
    now = shards(tmp_path, "m")
    assert len(now) < len(older) and all(split_keys(p)[1] == len(now) for p in now)  # no file of the older split
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in now]  # nor a temporary


def test_cli_splits_by_size_and_refuses_what_is_not_a_size(bloom, tmp_path):
    cli = [sys.executable, "-m", "pocketlm", "convert", str(bloom), "-q", "f32"]
    out = subprocess.run(
        [*cli, "-o", str(tmp_path / "c.gguf"), "--split-max-size", "50K", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    files = shards(tmp_path, "c")
    assert json.loads(out.stdout)["output"] == str(files[0]) and len(files) >= 3
    for bad in ("0", "lots"):
        run = subprocess.run(
            [*cli, "-o", str(tmp_path / "d.gguf"), "--split-max-size", bad], capture_output=True, text=True
        )
        assert run.returncode == 2 and "--split-max-size" in run.stderr and "Traceback" not in run.stderr


def test_splitting_is_a_gguf_option(tmp_path):
    make_t5(tmp_path / "hf", vocab=300)
    hf = tmp_path / "hf"
    with pytest.raises(PocketLMError, match="GGUF option"):
        pocketlm.convert(hf, tmp_path / "ct2", format="ct2", split_max_tensors=4)
    assert not (tmp_path / "ct2").exists()
