"""pocketlm.load on every kind of input, the conversion cache, overrides, batch files, doctor."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from reference import make_t5

import pocketlm
from pocketlm.backends.ctranslate2 import CT2Facts
from pocketlm.backends.llama_cpp import LlamaFacts
from pocketlm.cli.doctor import recommendations
from pocketlm.converters import convert
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.loading.facts import PlatformFacts


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bloom_folder(tmp_path_factory):
    return build_random_bloom(
        tmp_path_factory.mktemp("b") / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2
    )


def test_checkpoint_folder_is_converted_once_and_reused(bloom_folder, cache):
    with pocketlm.load(bloom_folder, progress=False) as model:
        first = model.info.path
        text = model.generate("Bonjour.", max_new_tokens=8).text
        assert model.info.quant == "q4_k_m" and model.info.format == "gguf"
        assert any("convert the checkpoint" in r for r in model.info.reasons)
    entries = list((cache / "converted").glob("*/manifest.json"))
    assert len(entries) == 1
    manifest = json.loads(entries[0].read_text())
    assert (
        manifest["format"] == "gguf"
        and manifest["quant"] == "q4_k_m"
        and "model.safetensors" in manifest["source"]["sha256"]
    )
    mtime = (entries[0].parent / "model.gguf").stat().st_mtime_ns
    with pocketlm.load(bloom_folder, progress=False) as model:  # reused: same file, untouched
        assert model.info.path == first and model.generate("Bonjour.", max_new_tokens=8).text == text
    assert (entries[0].parent / "model.gguf").stat().st_mtime_ns == mtime
    with pocketlm.load(bloom_folder, quant="q8_0", progress=False) as model:  # another quant, another entry
        assert model.info.quant == "q8_0"
    assert len(list((cache / "converted").glob("*/manifest.json"))) == 2


def test_changed_checkpoint_is_converted_again(tmp_path, cache):
    folder = build_random_bloom(tmp_path / "hf", hidden=64, n_layer=1, n_head=4, vocab_size=512)
    with pocketlm.load(folder, quant="f16", progress=False) as model:
        first = model.info.path
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    with pocketlm.load(folder, quant="f16", progress=False) as model:
        assert model.info.path != first


def test_t5_checkpoint_folder_converts_for_the_faster_engine(tmp_path, cache):
    make_t5(tmp_path / "hf", head="untied")
    with pocketlm.load(tmp_path / "hf", progress=False) as model:  # this machine: CPU only
        assert (model.info.backend, model.info.format, model.info.quant) == ("ctranslate2", "ct2", "int8")
        assert len(model.generate([5, 6, 7, 1], max_new_tokens=4).token_ids) >= 1
        assert any("seq2seq on CPU" in r for r in model.info.reasons)
    with pocketlm.load(tmp_path / "hf", backend="llama.cpp", progress=False) as model:
        assert (model.info.backend, model.info.format, model.info.quant) == ("llama.cpp", "gguf", "q8_0")
        assert len(model.generate([5, 6, 7, 1], max_new_tokens=4).token_ids) >= 1
    assert len(list((cache / "converted").glob("*/manifest.json"))) == 2


def test_environment_overrides(bloom_folder, tmp_path, monkeypatch):
    out = convert(bloom_folder, tmp_path / "m.gguf", quant="q8_0").output
    monkeypatch.setenv("POCKETLM_THREADS", "1")
    monkeypatch.setenv("POCKETLM_DEVICE", "cpu")
    with pocketlm.load(out) as model:
        assert model.info.threads == 1 and model.info.device == "cpu"
        assert "1 threads (given)" in model.info.reasons and "device cpu (given)" in model.info.reasons
    monkeypatch.setenv("POCKETLM_BACKEND", "ctranslate2")
    with pytest.raises(ModelLoadError, match="cannot run a gguf model"):
        pocketlm.load(out)


def test_bloomz_prompt_without_final_punctuation_warns_once(bloom_folder, tmp_path, caplog):
    out = convert(bloom_folder, tmp_path / "m.gguf", quant="q8_0").output
    with pocketlm.load(out) as model, caplog.at_level(logging.WARNING):
        model.generate("Translate to English: Je t'aime.", max_new_tokens=2)
        assert not [r for r in caplog.records if "punctuation" in r.getMessage()]
        model.generate("Translate to English: Je t'aime", max_new_tokens=2)
        model.generate("Another one without an end", max_new_tokens=2)
        assert len([r for r in caplog.records if "punctuation" in r.getMessage()]) == 1


def test_batch_jsonl_is_resumable(bloom_folder, tmp_path):
    gguf = convert(bloom_folder, tmp_path / "m.gguf", quant="q8_0").output
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": f"Question {i}: what is {i} + {i}?"}) for i in range(5)]
    lines.insert(2, json.dumps("A bare string prompt."))
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"

    def run():
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pocketlm",
                "run",
                gguf,
                "--input",
                prompts,
                "--output",
                out,
                "--max-new-tokens",
                "6",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert "answered 6 prompts (0 already answered)" in first.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", 3, "p2", "p3", "p4"]
    with pocketlm.load(gguf) as model:
        assert records[0]["text"] == model.generate("Question 0: what is 0 + 0?", max_new_tokens=6).text
    # a run killed mid-write leaves a torn line and misses the rest: the re-run repairs and completes
    out.write_text("\n".join(out.read_text().splitlines()[:3]) + '\n{"id": "p2", "te')
    second = run()
    assert "answered 3 prompts (3 already answered)" in second.stdout, second.stdout + second.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p0", "p1", 3, "p2", "p3", "p4"]
    assert "answered 0 prompts (6 already answered)" in run().stdout


def test_batch_input_errors_name_the_line(bloom_folder, tmp_path):
    gguf = convert(bloom_folder, tmp_path / "m.gguf", quant="q8_0").output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pocketlm", "run", gguf, "--input", bad, "--output", tmp_path / "o.jsonl"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "bad.jsonl:2: not valid JSON" in proc.stderr


def _facts(installed=True, **kw):
    base = dict(
        system="Linux",
        machine="x86_64",
        physical_cores=4,
        usable_cpus=4,
        ram_bytes=16 << 30,
        cpu_features=frozenset({"avx2"}),
    )
    base.update(kw)
    engines = {"llama.cpp": LlamaFacts(), "ctranslate2": CT2Facts()} if installed else {}
    return PlatformFacts(**base, engines=engines)


def test_doctor_recommendations():
    assert "nothing to improve" in recommendations(_facts())[0]
    mac = recommendations(_facts(system="Darwin", machine="arm64"))
    assert any("GGML_METAL=on" in t for t in mac)
    cuda = recommendations(_facts(nvidia_gpu=True))
    assert any("GGML_CUDA=on" in t for t in cuda) and any("CTranslate2 sees none" in t for t in cuda)
    missing = recommendations(_facts(installed=False))
    assert any("pip install llama-cpp-python" in t for t in missing) and any(
        "pip install ctranslate2" in t for t in missing
    )
    assert any("AVX2" in t for t in recommendations(_facts(cpu_features=frozenset({"avx"}))))
    assert any("RAM" in t for t in recommendations(_facts(ram_bytes=2 << 30)))


def test_doctor_command_json():
    proc = subprocess.run(
        [sys.executable, "-m", "pocketlm", "doctor", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine"]["physical_cores"] >= 1 and report["engines"]["llama-cpp-python"]
    assert report["would_choose"]["t5 CTranslate2 (int8)"]["backend"] == "ctranslate2"


def test_ctranslate2_sampling_means_what_the_sampler_means(tmp_path):
    """CTranslate2 samples inside the engine; its first-token frequencies must follow the same
    temperature/top-k/top-p distribution PocketLM's own sampler draws from."""
    from pocketlm.core.generation import GenerationOptions

    make_t5(tmp_path / "hf", vocab=140, head="untied")
    model = pocketlm.load(convert(tmp_path / "hf", tmp_path / "ct2", quant="float32").output)
    src = [5, 9, 12, 1]
    logits = model.logits(src)[0].astype(np.float64)
    params = GenerationOptions(temperature=0.7, top_k=8, top_p=0.9)
    # the distribution PocketLM's sampler defines (scaled, top-k, then top-p renormalised)
    scaled = logits / params.temperature
    order = np.argsort(-scaled)[: params.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
    expected = dict(zip(order[:keep].tolist(), (probs[:keep] / probs[:keep].sum()).tolist()))
    for seeded in (False, True):  # CTranslate2's own sampler, and the seeded step-by-step path
        draws = [
            model.generate(
                src, max_new_tokens=1, temperature=0.7, top_k=8, top_p=0.9, seed=s if seeded else None
            ).token_ids[0]
            for s in range(600)
        ]
        assert set(draws) <= set(expected), "a token outside the top-k/top-p set was drawn"
        freq = {t: draws.count(t) / len(draws) for t in expected}
        assert max(abs(freq[t] - p) for t, p in expected.items()) < 0.06, (seeded, freq, expected)
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    again = [model.generate(src, **kw).token_ids for _ in range(2)]
    assert again[0] == again[1] and model.generate([src, src], **kw)[1].token_ids == again[0]
