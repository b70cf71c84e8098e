"""Split GGUF models (llama.cpp's gguf-split format, `<name>-00001-of-0000N.gguf`...) are one model.

Split files are made here by gguf-py's own writer (`GGUFWriter(split_max_tensors=...)`) from
an unsplit file PocketLM converted, and read by llama.cpp: loading by the first file or any
other gives the unsplit file's logits exactly (f32); `info`, the cache, `pull` and `quantize`
see one model; a missing or foreign file is refused in one line.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from fake_hub import FakeHub
from reference import make_t5, random_ids
from test_hub import env, run_cli

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.converters.core.gguf_file import read_header
from pocketlm.converters.core.gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, split_name, split_parts
from pocketlm.converters.synthetic import build_random_bloom

SHARDS = 3


def split_gguf(src, dest, shards=SHARDS, small_first=False):
    """Write `src` again as a split model named after `dest` (dest-00001-of-0000N.gguf, ...)
    with gguf-py's writer: the same keys, then the same tensors, in `shards` files (with
    `small_first`, the first holds the metadata only, as convert_hf_to_gguf's
    --no-tensor-first-split writes it)."""
    reader = gguf.GGUFReader(src)
    tensors = list(reader.tensors)
    arch = reader.fields["general.architecture"].contents()
    per_file = -(-len(tensors) // (shards - small_first))
    writer = gguf.GGUFWriter(dest, arch, split_max_tensors=per_file, small_first_shard=small_first)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the header's own counts; the writer adds the architecture
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    files = writer.format_shard_names(writer.path)
    assert len(files) == shards and all(f.is_file() for f in files)
    return files


def _load(path):
    return pocketlm.load(path, threads=2, parallel=1, backend="llama.cpp")


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    folder = build_random_bloom(root / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    whole = Path(convert(folder, root / "bloom.gguf", quant="f32").output)
    (root / "split").mkdir()
    return folder, whole, split_gguf(whole, root / "split" / "bloom.gguf")


def _logits(path, prompts):
    with _load(path) as model:
        return model.info, [model.logits(ids) for ids in prompts]


def test_split_names_are_llama_cpps():
    """gguf-py's shard names, ours and llama.cpp's llama_split_path/llama_split_prefix agree."""
    from pocketlm.converters.core import engine

    llama = engine.llama_cpp()
    buf = ctypes.create_string_buffer(4096)
    for no, count in ((0, 3), (2, 3), (11, 12), (99, 65535)):
        n = llama.llama_split_path(buf, len(buf), b"/models/bloomz-q4_k_m", no, count)
        assert buf.value.decode() == "/models/" + split_name("bloomz-q4_k_m", no, count) and n == len(buf.value)
        writer = gguf.GGUFWriter(None, "bloom")
        writer.tensors = [{}] * count  # what its names depend on: the number of files
        assert buf.value.decode() == str(writer.format_shard_names(Path("/models/bloomz-q4_k_m.gguf"))[no])
        name = split_name("bloomz-q4_k_m", no, count)
        assert split_parts(name) == ("bloomz-q4_k_m", no, count)
        size = llama.llama_split_prefix(buf, len(buf), f"/m/{name}".encode(), no, count)
        assert buf.value.decode() == "/m/bloomz-q4_k_m" and size == len("/m/bloomz-q4_k_m")
    assert split_parts("bloom.gguf") is None and split_parts("bloom-00004-of-00003.gguf") is None


def test_split_keys_as_llama_cpp_reads_them(bloom):
    """Every file carries split.no/count/tensors.count; llama.cpp loads the model from the
    first file with every tensor and the first file's metadata."""
    _, whole, files = bloom
    headers = [read_header(f) for f in files]
    total = sum(len(h.tensors) for h in headers)
    assert total == len(read_header(whole).tensors)
    for i, h in enumerate(headers):
        assert (h.metadata[SPLIT_NO], h.metadata[SPLIT_COUNT], h.metadata[SPLIT_TENSORS]) == (i, SHARDS, total)
        assert h.tensors, "every file holds tensors"
    assert "general.architecture" not in headers[1].metadata  # the others hold only split.*
    from pocketlm.converters.core import engine

    llama = engine.llama_cpp()
    params = llama.llama_model_default_params()
    counts = []
    for path in (whole, files[0]):
        with engine.quiet_c_output():
            model = llama.llama_model_load_from_file(str(path).encode(), params)
        assert model, engine.recent_log()
        buf = ctypes.create_string_buffer(64)
        llama.llama_model_meta_val_str(model, SPLIT_COUNT.encode(), buf, len(buf))
        counts.append((llama.llama_model_n_params(model), buf.value))
        llama.llama_model_free(model)
    assert counts == [(counts[0][0], b""), (counts[0][0], str(SHARDS).encode())]
    with engine.quiet_c_output():
        assert not llama.llama_model_load_from_file(str(files[1]).encode(), params)  # llama.cpp wants the first


@pytest.mark.parametrize("which", [0, SHARDS - 1, "metadata-only first file"])
def test_split_model_gives_the_whole_files_logits(bloom, which, tmp_path):
    _, whole, files = bloom
    if which == "metadata-only first file":
        files = split_gguf(whole, tmp_path / "bloom.gguf", small_first=True)
        assert not read_header(files[0]).tensors
        which = 1
    prompts = [random_ids(12, 512, seed) for seed in (1, 2)]
    _, expected = _logits(whole, prompts)
    info, got = _logits(files[which], prompts)
    assert info.path == str(files[0]) and info.quant == "f32"
    for e, g in zip(expected, got):
        assert np.array_equal(e, g)


def _copy(files, dest):
    dest.mkdir()
    return [shutil.copy(f, dest / f.name) for f in files]


def test_missing_or_foreign_file_is_one_line(bloom, tmp_path):
    _, whole, files = bloom
    copies = [Path(p) for p in _copy(files, tmp_path / "m")]
    os.remove(copies[1])
    for given in (copies[0], copies[2]):
        with pytest.raises(ModelLoadError) as e:
            _load(given)
        assert "\n" not in str(e.value) and f"{copies[1].name} (file 2) is missing" in str(e.value), e.value
    cli = run_cli(dict(os.environ), "run", copies[0], "hi")
    assert cli.returncode != 0 and copies[1].name in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    # a file of another split in its place (its own split.no/count), and a renamed file
    other = split_gguf(whole, tmp_path / "other.gguf", shards=2)
    shutil.copy(other[1], copies[1])
    with pytest.raises(ModelLoadError, match=r"says it is file 2 of 2, not 2 of 3"):
        _load(copies[0])
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(files[0], renamed)
    with pytest.raises(ModelLoadError, match=r"file 1 of a model split in 3 files, but not named <name>-00001"):
        _load(renamed)


def test_info_reports_every_file(bloom):
    _, whole, files = bloom
    proc = run_cli(dict(os.environ), "info", files[-1], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["path"] == str(files[0]) and report["files"] == [str(f) for f in files]
    assert report["size_bytes"] == sum(f.stat().st_size for f in files)
    single = json.loads(run_cli(dict(os.environ), "info", whole, "--json").stdout)
    assert single["files"] == [str(whole)] and single["size_bytes"] == whole.stat().st_size
    for key in ("parameters", "tensors", "tensor_types", "quant", "architecture", "context_length"):
        assert report[key] == single[key], key
    assert report["would_run_on"]["serving_kv_cells"] == single["would_run_on"]["serving_kv_cells"]


def test_cache_keeps_a_split_conversion_as_one_entry(bloom, tmp_path, monkeypatch, caplog):
    """A conversion written as split files (as `--split-max-size` will) is one entry: listed
    once with all its bytes, hashed over every file, rebuilt when one is damaged or missing."""
    import pocketlm.converters as converters
    from pocketlm.loading import cache

    folder, _, _ = bloom
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    real = converters.convert
    runs = []

    def split_convert(src, output, **kwargs):
        runs.append(output)
        summary = real(src, output.with_name("whole.gguf"), **kwargs)
        first = split_gguf(summary.output, output)[0]
        os.remove(summary.output)
        summary.output = str(first)
        return summary

    monkeypatch.setattr(converters, "convert", split_convert)
    first = cache.converted(folder, "gguf", "f32")
    assert first.name == split_name("model", 0, SHARDS) and len(runs) == 1
    files = [first.with_name(split_name("model", i, SHARDS)) for i in range(SHARDS)]
    (entry,) = cache.entries()
    assert entry.manifest["output"] == first.name
    assert entry.size_bytes >= sum(f.stat().st_size for f in files)
    assert cache.converted(folder, "gguf", "f32") == first and len(runs) == 1  # reused
    with open(files[1], "r+b") as f:  # a damaged middle file
        f.seek(files[1].stat().st_size // 2)
        f.write(b"\xff" * 64)
    assert cache.converted(folder, "gguf", "f32") == first and len(runs) == 2
    assert "does not match its manifest" in caplog.text
    os.remove(files[2])
    assert cache.converted(folder, "gguf", "f32") == first and len(runs) == 3
    assert f"lacks its model's {files[2].name}" in caplog.text
    listing = run_cli(dict(os.environ), "list", "--json")
    assert [e["path"] for e in json.loads(listing.stdout)] == [str(entry.path)]
    with _load(first) as model:
        assert model.info.path == str(first)


def test_pull_fetches_every_file_of_the_split_quant(bloom, tmp_path):
    folder, whole, _ = bloom
    q8 = convert(folder, tmp_path / "bloom.Q8_0.gguf", quant="q8_0").output
    shards = split_gguf(q8, tmp_path / "bloom-Q8_0.gguf")
    files = {f.name: f.read_bytes() for f in shards}
    files["bloom.F32.gguf"] = whole.read_bytes()
    with FakeHub() as hub:
        hub.add("tiny/bloom-split", {**files, "README.md": b"# split"})
        e = env(tmp_path, hub)
        pulled = run_cli(e, "pull", "tiny/bloom-split")  # q8_0 is preferred to f32
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip().endswith(shards[0].name) and "using q8_0" in pulled.stderr
        assert sorted(hub.downloads("tiny/bloom-split")) == sorted(f.name for f in shards)
        offline = run_cli({**e, "HF_HUB_OFFLINE": "1"}, "run", "tiny/bloom-split", "Bonjour", "--max-new-tokens", "2")
        assert offline.returncode == 0, offline.stderr
        f32 = run_cli(e, "pull", "tiny/bloom-split", "--quant", "f32")
        assert f32.returncode == 0 and f32.stdout.strip().endswith("bloom.F32.gguf"), f32.stderr
        del files[shards[2].name]
        hub.add("tiny/bloom-gap", files)
        gap = run_cli(e, "pull", "tiny/bloom-gap", "--quant", "q8_0")
        assert gap.returncode == 1 and f"the repo lacks {shards[2].name}" in gap.stderr, gap.stderr


def test_quantize_reads_a_split_source(bloom, tmp_path):
    """llama.cpp's quantizer reads every file of the split (given any) and writes one file,
    tensor for tensor the quantization of the unsplit source."""
    _, whole, files = bloom
    outs = {}
    for name, src in (("whole", whole), ("split", files[1])):
        out = tmp_path / f"{name}-q8_0.gguf"
        proc = run_cli(dict(os.environ), "quantize", src, out, "--quant", "q8_0")
        assert proc.returncode == 0, proc.stderr
        outs[name] = read_header(out)
    assert SPLIT_COUNT not in outs["split"].metadata
    with open(tmp_path / "whole-q8_0.gguf", "rb") as a, open(tmp_path / "split-q8_0.gguf", "rb") as b:
        for x, y in zip(outs["whole"].tensors, outs["split"].tensors, strict=True):
            assert (x.name, x.type, x.shape) == (y.name, y.type, y.shape)
            a.seek(x.offset)
            b.seek(y.offset)
            assert a.read(x.nbytes) == b.read(y.nbytes), x.name


def test_split_t5_gives_the_whole_files_logits(tmp_path):
    make_t5(tmp_path / "hf", n_layers=2)
    whole = Path(convert(tmp_path / "hf", tmp_path / "t5.gguf", format="gguf", quant="f32").output)
    (tmp_path / "split").mkdir()
    files = split_gguf(whole, tmp_path / "split" / "t5.gguf")
    cases = [(random_ids(9, 160, seed) + [1], [0, *random_ids(4, 160, seed + 10)]) for seed in (1, 2)]
    got = {}
    for name, path in (("whole", whole), ("split", files[-1])):
        with _load(path) as model:
            assert model.info.path == str(files[0] if name == "split" else whole)
            got[name] = [model.logits(src, dec) for src, dec in cases]
    for e, g in zip(got["whole"], got["split"]):
        assert np.array_equal(e, g)
