"""T5 GGUF files written by llama.cpp's own converter (`convert_hf_to_gguf.py`) score as
transformers does.

llama.cpp's converter writes a tied T5 (head = token embedding) without the d_model**-0.5
output scale transformers applies, and its graph never scales: logits come out sqrt(d_model)
times too sharp (greedy unchanged). The runtime applies the scale on load and says so in
`info` (runtime/backends/llama_seq2seq.py, `lacks_output_scale`).

The converter is the one vendored in the llama-cpp-python sdist of the installed version (with
its own gguf-py: the `gguf` package on PyPI lags behind it). It is taken from
POCKETLM_LLAMA_CPP_SOURCE (a llama.cpp source tree) if set, else from an unpacked sdist in
/tmp/lcp, else from .cache/llama-cpp-converter/<version>/, else from the source tree that
benchmarks/llama_tools.py keeps with its build of llama.cpp's tools, else the first run fills
.cache/llama-cpp-converter/<version>/ with `pip download` (about 75 MB, once per machine; the
sdist itself is not kept; download and safe unpacking are llama_tools').
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from parity import relative_error
from reference import T5_PIECES, hf_seq2seq_greedy, hf_seq2seq_logits, make_t5, random_ids, write_state

import pocketlm
from pocketlm.backends.llama_seq2seq import lacks_output_scale
from pocketlm.cli.report import describe, model_report
from pocketlm.converters import convert
from pocketlm.converters.core.gguf_file import read_header

REPO = Path(__file__).resolve().parent.parent
CONVERTER = "convert_hf_to_gguf.py"
TREE = (CONVERTER, "conversion/__init__.py", "gguf-py/gguf/__init__.py")  # what the converter imports
D_MODEL = 64
SCALE = D_MODEL**-0.5
SCALED = "output scaled by d_model**-0.5"


def _llama_tools() -> ModuleType:
    """benchmarks/llama_tools.py (the sdist's download and safe unpacking), by its path."""
    spec = importlib.util.spec_from_file_location("llama_tools", REPO / "benchmarks" / "llama_tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llama_tools = _llama_tools()


def _is_tree(path: Path) -> bool:
    return all((path / name).is_file() for name in TREE)


def _unpack_converter(sdist: Path, dest: Path) -> None:
    """The converter, its `conversion` package and gguf-py from the sdist, into `dest` (atomic)."""
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        try:
            llama_tools.unpack_vendored(
                sdist, work, keep=lambda rel: rel == CONVERTER or rel.startswith(("conversion/", "gguf-py/"))
            )
        except llama_tools.ToolsUnavailable as e:
            pytest.fail(str(e))
        if not _is_tree(work):
            pytest.fail(f"{sdist.name} lacks part of the converter: {TREE}")
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def llama_converter() -> Path:
    """The llama.cpp source tree holding convert_hf_to_gguf.py for the installed llama-cpp-python."""
    version = installed_version("llama-cpp-python")
    env = os.environ.get("POCKETLM_LLAMA_CPP_SOURCE")
    if env:
        if not _is_tree(Path(env)):
            pytest.fail(f"POCKETLM_LLAMA_CPP_SOURCE={env}: not a llama.cpp source tree with {', '.join(TREE)}")
        return Path(env)
    cached = REPO / ".cache" / "llama-cpp-converter" / version
    built = llama_tools.source_tree(version)  # the source benchmarks/llama_tools.py built its tools from
    for tree in (Path(f"/tmp/lcp/llama_cpp_python-{version}/vendor/llama.cpp"), cached, built):
        if tree and _is_tree(tree):
            return tree
    return download_converter(version, cached)


def download_converter(version: str, dest: Path) -> Path:
    """Unpack the converter of llama-cpp-python `version`'s sdist (from PyPI, with pip) into `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as download:
        try:
            sdist = llama_tools.download_sdist(version, Path(download))
        except llama_tools.ToolsUnavailable as e:
            pytest.fail(f"llama.cpp's {CONVERTER}: {e}")
        if not _is_tree(dest):  # another run may have unpacked it meanwhile
            shutil.rmtree(dest, ignore_errors=True)  # a partial tree
            _unpack_converter(sdist, dest)
    return dest


def _convert_all(converter: Path, jobs: dict[str, Path]) -> dict[str, Path]:
    """Run llama.cpp's converter (f32) on each checkpoint folder, all at once; the GGUF paths."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not the installed one
    env["HF_HUB_OFFLINE"] = "1"
    outs = {name: folder.parent / f"{name}.llama-cpp.gguf" for name, folder in jobs.items()}
    procs = {}
    for name, folder in jobs.items():
        cmd = [sys.executable, str(converter / CONVERTER), str(folder), "--outtype", "f32", "--outfile"]
        cmd.append(str(outs[name]))
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        if proc.returncode:
            pytest.fail(f"llama.cpp's {CONVERTER} failed on {name}:\n{log[-3000:]}")
    return outs


@pytest.fixture(scope="module")
def files(llama_converter, tmp_path_factory, t5_tokenizer_files):
    """name -> (transformers model, GGUF written by llama.cpp's converter)."""
    root = tmp_path_factory.mktemp("foreign-t5")
    spiece = {"spiece.model": t5_tokenizer_files["spiece.model"]}  # what the converter reads the vocabulary from
    kw = dict(d_model=D_MODEL, vocab=T5_PIECES + 100, tokenizer_files=spiece)  # 100 extra ids, as T5's
    refs = {
        # original T5: tied, scaled; saved as transformers saves it (no lm_head.weight)
        "tied-scaled": make_t5(root / "tied-scaled", ff="relu", head="tied-scaled", **kw),
        "flan-untied": make_t5(root / "flan-untied", head="untied", **kw),
        # tied, scale_decoder_outputs: false (transformers 5's T5Config(tie_word_embeddings=False),
        # or a model built from a T5 v1.1 config): the same shapes as "tied-scaled", to show the
        # two files differ in nothing but their weights and name
        "tied-unscaled": make_t5(root / "tied-unscaled", ff="relu", head="tied-unscaled", seed=1, **kw),
    }
    # A pytorch_model.bin of a tied model's whole state dict holds the tied lm_head.weight too:
    # llama.cpp's converter then writes `output` as a copy of the embedding.
    ref = refs["tied-scaled"]
    cfg = {**ref.config.to_dict(), "architectures": ["T5ForConditionalGeneration"]}
    write_state(ref.state_dict(), cfg, root / "tied-bin-lm-head", "bin")
    shutil.copy(spiece["spiece.model"], root / "tied-bin-lm-head" / "spiece.model")
    refs["tied-bin-lm-head"] = ref
    ggufs = _convert_all(llama_converter, {name: root / name for name in refs})
    return {name: (refs[name], ggufs[name]) for name in refs}


def _worst(model, ref, factor: float = 1.0) -> float:
    """Max |logit difference| over max |logit| between `model` and transformers' logits x factor."""
    worst = 0.0
    for seed in range(3):
        src = random_ids(40, ref.config.vocab_size, seed) + [1]
        dec = [0] + random_ids(25, ref.config.vocab_size, seed + 10)
        expected = hf_seq2seq_logits(ref, src, dec) * factor
        got = model.logits(src, dec)
        assert got.shape == expected.shape and got.dtype == np.float32
        worst = max(worst, relative_error(got, expected))
    return worst


def _log_likelihood(ref, src: list[int], cand: list[int]) -> float:
    logits = hf_seq2seq_logits(ref, src, [0] + cand).astype(np.float64)[: len(cand)]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(sum(logp[i, t] for i, t in enumerate(cand)))


def test_what_llama_cpps_converter_writes(files):
    """The facts the rule rests on: no `output` for a tied T5 saved by transformers, a copy of
    the embedding from a .bin holding lm_head.weight, its own `output` for an untied one; no
    PocketLM keys, and nothing that tells scaled from unscaled."""
    heads = {}
    for name, (_, path) in files.items():
        header = read_header(path)
        assert header.architecture == "t5" and not any(k.startswith("pocketlm.") for k in header.metadata)
        heads[name] = "output.weight" in {t.name for t in header.tensors}
    assert heads == {"tied-scaled": False, "flan-untied": True, "tied-unscaled": False, "tied-bin-lm-head": True}
    scaled, unscaled = (read_header(files[n][1]) for n in ("tied-scaled", "tied-unscaled"))
    assert [(t.name, t.shape, t.type) for t in scaled.tensors] == [(t.name, t.shape, t.type) for t in unscaled.tensors]
    assert {k: v for k, v in scaled.metadata.items() if k != "general.name"} == {
        k: v for k, v in unscaled.metadata.items() if k != "general.name"
    }


@pytest.mark.parametrize("name", ["tied-scaled", "tied-bin-lm-head"])
def test_tied_t5_is_scaled_on_load(files, name):
    ref, path = files[name]
    with pocketlm.load(path, threads=2) as model:
        assert any(r.startswith(SCALED) for r in model.info.reasons), model.info.reasons
        worst = _worst(model, ref)
        print(f"\n{name}: max logit difference {worst:.1e} x max|logit|")
        assert worst <= 1e-4
        src = random_ids(8, ref.config.vocab_size, 30) + [1]
        cands = [[5, 6, 1], [7, 1], [9, 8, 7, 6, 1]]
        for cand, score in zip(cands, model.score(src, cands)):
            assert score == pytest.approx(_log_likelihood(ref, src, cand), rel=1e-4, abs=1e-4)
        assert model.generate(src, max_new_tokens=16).token_ids == hf_seq2seq_greedy(ref, src, 16)
    # Unscaled, the same file is sqrt(d_model) = 8 times too sharp (what it was before the fix).
    with pocketlm.load(path, threads=2, output_scale=1.0) as raw:
        assert _worst(raw, ref, D_MODEL**0.5) <= 1e-4
        assert not any(r.startswith(SCALED) for r in raw.info.reasons)


def test_generation_samples_from_the_scaled_logits(files, tmp_path):
    """Sampling (the generation path, not `logits()`) draws from transformers' distribution:
    the same seed gives the same tokens as PocketLM's own conversion of the checkpoint."""
    ref, path = files["tied-scaled"]
    own = convert(path.parent / "tied-scaled", tmp_path / "own.gguf", format="gguf", quant="f32").output
    src = random_ids(10, ref.config.vocab_size, 40) + [1]
    options = dict(max_new_tokens=24, temperature=1.0, top_k=0, seed=7)
    with pocketlm.load(own, threads=2) as model:
        assert not any(r.startswith(SCALED) for r in model.info.reasons)
        expected = model.generate(src, **options).token_ids
    with pocketlm.load(path, threads=2) as model:
        assert model.generate(src, **options).token_ids == expected
    with pocketlm.load(path, threads=2, output_scale=1.0) as model:
        assert model.generate(src, **options).token_ids != expected  # 8x sharper: other draws


def test_untied_t5_is_left_alone(files):
    ref, path = files["flan-untied"]
    with pocketlm.load(path, threads=2) as model:
        assert not any(r.startswith(SCALED) for r in model.info.reasons)
        # gated GELU: llama.cpp's f16 GELU table costs ~4e-4 (PocketLM's own file of this
        # checkpoint measures the same; tests/test_t5_gguf.py allows 1e-3); a wrong scale is 0.875
        assert _worst(model, ref) <= 1e-3


def test_tied_unscaled_checkpoint_needs_output_scale_1(files):
    """A tied T5 saved with scale_decoder_outputs: false converts to a file identical to an
    original T5's but for its name: it is scaled too (documented), and output_scale=1.0 undoes it."""
    ref, path = files["tied-unscaled"]
    with pocketlm.load(path, threads=2) as model:
        assert any(r.startswith(SCALED) for r in model.info.reasons)
        assert _worst(model, ref, SCALE) <= 1e-4
    with pocketlm.load(path, threads=2, output_scale=1.0) as model:
        assert _worst(model, ref) <= 1e-4


def test_pocketlm_files_are_never_rescaled(files, tmp_path):
    """PocketLM folds the scale into `output`; its tied unscaled T5 has no `output` at all."""
    for name in ("tied-scaled", "tied-unscaled"):
        own = convert(files[name][1].parent / name, tmp_path / f"{name}.gguf", format="gguf", quant="f32").output
        header = read_header(own)
        assert ("output.weight" in {t.name for t in header.tensors}) == (name == "tied-scaled")
        assert not lacks_output_scale(header, own)


def test_info_says_it_is_scaled(files):
    _, path = files["tied-scaled"]
    report = model_report(str(path))
    assert any(r.startswith(SCALED) for r in report["would_run_on"]["reasons"])
    assert f"{SCALED} (0.125)" in describe(report)
    assert not any(r.startswith(SCALED) for r in model_report(str(files["flan-untied"][1]))["would_run_on"]["reasons"])
