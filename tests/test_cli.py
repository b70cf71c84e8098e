"""The `pocketlm` command line: outputs, JSON, provenance, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import pocketlm.converters.gguf_target as gguf_target
from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return build_random_bloom(tmp_path_factory.mktemp("cli") / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)


@pytest.fixture(scope="module")
def gguf_path(hf_folder):
    out = hf_folder.parent / "m-q8_0.gguf"
    proc = run_cli("convert", hf_folder, "-o", out, "--quant", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["output"] == str(out) and summary["quant"] == "q8_0" and summary["tensors"] == 29
    assert summary["types"] == {"f32": 20, "q8_0": 9}
    return out


def test_info_shows_provenance(gguf_path, hf_folder):
    proc = run_cli("info", gguf_path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "bloom" and info["quant"] == "q8_0" and info["tokenizer"] == "gpt2"
    assert info["converter"]["name"] == "pocketlm" and info["converter"]["version"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        digest = hashlib.sha256((hf_folder / name).read_bytes()).hexdigest()
        assert info["source"]["files"][name] == digest
    assert info["would_run_on"]["backend"] == "llama.cpp"
    text = run_cli("info", gguf_path).stdout
    assert "sha256" in text and "would run on" in text


def test_run_streams_the_same_text_as_json(gguf_path):
    streamed = run_cli("run", gguf_path, "Translate to English: Je t'aime.", "--max-new-tokens", "12")
    as_json = run_cli("run", gguf_path, "Translate to English: Je t'aime.", "--max-new-tokens", "12", "--json")
    assert streamed.returncode == as_json.returncode == 0, streamed.stderr + as_json.stderr
    result = json.loads(as_json.stdout)
    assert streamed.stdout == result["text"] + "\n"
    assert result["finish_reason"] in ("length", "stop") and result["prompt_tokens"] > 0
    from_stdin = run_cli(
        "run", gguf_path, "-", "--max-new-tokens", "12", "--no-stream", stdin="Translate to English: Je t'aime."
    )
    assert from_stdin.stdout == streamed.stdout


def test_quantize_requantizes_a_gguf(hf_folder, tmp_path):
    f32 = tmp_path / "m-f32.gguf"
    convert(hf_folder, f32, quant="f32")
    proc = run_cli("quantize", f32, tmp_path / "m-q4_0.gguf", "--quant", "q4_0")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run_cli("info", tmp_path / "m-q4_0.gguf", "--json").stdout)
    assert "q4_0" in info["tensor_types"]


def _one_line_error(proc, pattern):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("pocketlm: error: ") and pattern in lines[0], lines[0]


def test_user_errors_are_one_line(tmp_path, gguf_path, hf_folder):
    _one_line_error(run_cli("convert", tmp_path / "nope", "-o", tmp_path / "x.gguf"), "not a folder")
    _one_line_error(run_cli("convert", tmp_path, "-o", tmp_path / "x.gguf"), "config.json: missing")
    _one_line_error(run_cli("convert", hf_folder, "-o", gguf_path), "already exists (use --force")
    _one_line_error(
        run_cli("convert", hf_folder, "-o", tmp_path / "x.gguf", "--quant", "q9"), "unknown GGUF quant type"
    )
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(run_cli("run", tmp_path / "notes.txt", "hi"), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:3000])
    _one_line_error(run_cli("run", truncated, "hi"), "truncated.gguf")
    _one_line_error(run_cli("run", gguf_path, "--ids", "1,x"), "--ids")
    assert not (tmp_path / "x.gguf").exists()


def test_module_entry_points_have_help():
    for module in ("pocketlm", "pocketlm.converters"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout


def test_generation_flags_come_from_the_options_fields():
    """`run`'s generation flags are made from GenerationOptions' fields; GenerationKwargs (for
    type checkers) is spelled out and must name the same fields."""
    import dataclasses

    from pocketlm.cli.main import build_parser
    from pocketlm.core.generation import GenerationKwargs, GenerationOptions

    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    assert set(GenerationKwargs.__annotations__) == names
    parsed = vars(build_parser("run").parse_args(["run", "model.gguf"]))
    assert names & set(parsed) == names - {"min_new_tokens"}  # the one field without a flag


def test_interrupted_conversion_leaves_nothing(hf_folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gguf_target._encode

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_target, "_encode", flaky)
    for quant in ("q8_0", "q4_k_m"):  # direct, and through the intermediate file
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            convert(hf_folder, tmp_path / f"out-{quant}.gguf", quant=quant)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gguf_target, "_encode", real)
    summary = convert(hf_folder, tmp_path / "out-q4_k_m.gguf", quant="q4_k_m")
    assert [p.name for p in tmp_path.iterdir()] == ["out-q4_k_m.gguf"] and summary.size_bytes > 0


def test_source_repo_and_revision_recorded_from_hf_cache_layout(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--bigscience--bloomz-560m" / "snapshots" / revision
    build_random_bloom(snapshot, hidden=64, n_layer=1, n_head=4, vocab_size=512)
    convert(snapshot, tmp_path / "m.gguf", quant="f16")
    info = json.loads(run_cli("info", tmp_path / "m.gguf", "--json").stdout)
    assert info["source"]["repo"] == "bigscience/bloomz-560m"
    assert info["source"]["revision"] == revision
    assert info["metadata"]["general.source.url"] == "https://huggingface.co/bigscience/bloomz-560m"


def test_main_job_uses_bloomz_from_the_hf_cache(tmp_path):
    """`make run`'s real-model branch, with a stand-in checkpoint in the HF cache layout."""
    revision = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hf_home" / "hub" / "models--bigscience--bloomz-560m"
    build_random_bloom(repo / "snapshots" / revision, hidden=64, n_layer=1, n_head=4, vocab_size=512)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "POCKETLM_CACHE": str(tmp_path / "cache"),
    }
    run = lambda: subprocess.run(
        [sys.executable, "-m", "pocketlm.cli.demo"], capture_output=True, text=True, env=env, timeout=600
    )
    first = run()
    assert first.returncode == 0, first.stderr
    assert "using bigscience/bloomz-560m from" in first.stdout and "[synthetic]" not in first.stdout
    assert "answer: " in first.stdout and "q4_k_m" in first.stdout
    second = run()
    assert "reusing" in second.stdout and second.returncode == 0


def test_t5_convert_run_info(tmp_path):
    from reference import make_t5, make_t5_tokenizer
    from test_t5_tokenizer import CORPUS

    tok = make_t5_tokenizer(tmp_path / "spm", CORPUS, pieces=180)
    make_t5(tmp_path / "hf", vocab=300, tokenizer_files={"tokenizer.json": tok["tokenizer.json"]})
    out = tmp_path / "t5-ct2"
    proc = run_cli("convert", tmp_path / "hf", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["format"], summary["quant"], summary["architecture"]) == ("ct2", "int8", "t5")
    info = json.loads(run_cli("info", out, "--json").stdout)
    assert info["format"] == "ct2" and info["tokenizer"] == "tokenizer.json" and info["quant"] == "int8"
    assert info["would_run_on"]["backend"] == "ctranslate2" and info["would_run_on"]["compute_type"] == "int8"
    assert (
        info["source"]["files"]["config.json"]
        == hashlib.sha256((tmp_path / "hf" / "config.json").read_bytes()).hexdigest()
    )
    run = run_cli("run", out, "Translate to English: Je t'aime.", "--max-new-tokens", "8", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["prompt_tokens"] > 1
    _one_line_error(
        run_cli("convert", tmp_path / "hf", "-o", tmp_path / "x", "--quant", "q4_k_m"),
        "unknown CTranslate2 quant type",
    )
