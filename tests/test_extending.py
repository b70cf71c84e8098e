"""A new architecture and a new backend are each one file dropped into their package.

The fixtures put tests/fixtures/gpt2.py into convert/architectures/ and
tests/fixtures/fake_backend.py into runtime/backends/ (by extending the package's search
path, which is what a file in the folder amounts to) and edit nothing else: conversion, the
runtime's choices, the CLI's help and choices, `info` and `doctor` pick them up.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from parity import assert_close

import pocketlm
from pocketlm.converters import convert

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def _drop_in(monkeypatch, tmp_path, package, fixture: str, name: str):
    """Make `fixture` a module `name` of `package` and rediscover the package's modules."""
    folder = tmp_path / package.__name__.replace(".", "_")
    folder.mkdir()
    shutil.copy(FIXTURES / fixture, folder / f"{name}.py")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(package, "_discovered", False)
    package.discover()
    return sys.modules[f"{package.__name__}.{name}"]


@pytest.fixture()
def gpt2_arch(monkeypatch, tmp_path):
    import pocketlm.converters.architectures as registry

    registry.discover()  # the built-in ones first: teardown restores exactly these
    saved = dict(registry.ARCHITECTURES), dict(registry._BY_NAME)
    module = _drop_in(monkeypatch, tmp_path, registry, "gpt2.py", "gpt2")
    yield module
    registry.ARCHITECTURES.clear(), registry.ARCHITECTURES.update(saved[0])
    registry._BY_NAME.clear(), registry._BY_NAME.update(saved[1])
    sys.modules.pop(module.__name__, None)


@pytest.fixture()
def fake_backend(monkeypatch, tmp_path):
    import pocketlm.backends as registry
    from pocketlm.loading.machine import detect_facts

    registry.discover()
    module = _drop_in(monkeypatch, tmp_path, registry, "fake_backend.py", "fake")
    detect_facts.cache_clear()
    yield module
    registry.unregister("fake")
    sys.modules.pop(module.__name__, None)
    detect_facts.cache_clear()


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2") / "hf"
    model.save_pretrained(folder)
    return folder, model


def test_a_dropped_in_architecture_converts_and_runs_at_parity(gpt2_arch, gpt2_checkpoint, tmp_path, monkeypatch):
    import torch

    from pocketlm.converters.cli import convert_epilog

    folder, ref = gpt2_checkpoint
    assert "gpt2" in convert_epilog() and "GPT-2: GGUF q8_0" in convert_epilog()
    summary = convert(folder, tmp_path / "gpt2-f32.gguf", quant="f32")
    assert (summary.architecture, summary.format) == ("gpt2", "gguf")
    ids = [5, 17, 250, 3, 99, 42, 7]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    with pocketlm.load(summary.output, threads=2) as model:
        got = model.logits(ids)
        assert model.info.architecture == "gpt2"
        # llama.cpp's CPU GELU reads an f16 table (its input rounded to f16): 1.2e-4 here, 2e-4 allowed
        assert_close(got, expected, 2e-4)
    # a checkpoint folder: the runtime converts it with the architecture's own default quant
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    with pocketlm.load(folder, progress=False, threads=2) as model:
        assert (model.info.format, model.info.quant) == ("gguf", "q8_0")
        assert any("convert the checkpoint to gguf q8_0" in r for r in model.info.reasons)


def test_greedy_generation_of_a_dropped_in_architecture_matches_transformers(gpt2_arch, gpt2_checkpoint, tmp_path):
    import torch

    folder, ref = gpt2_checkpoint
    ids = [11, 12, 13, 14]
    with torch.no_grad():
        hf = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
            0, len(ids) :
        ].tolist()
    with pocketlm.load(convert(folder, tmp_path / "g.gguf", quant="f32").output, threads=2) as model:
        assert model.generate(ids, max_new_tokens=8, min_new_tokens=8).token_ids == hf


def test_a_dropped_in_backend_needs_no_other_edit(fake_backend, tmp_path, capsys):
    from pocketlm.backends import get_backend
    from pocketlm.cli.main import build_parser, main

    folder = tmp_path / "counter"
    folder.mkdir()
    (folder / "fake-model.json").write_text(json.dumps({"architecture": "counter"}))
    with pocketlm.load(folder) as model:  # found by its own format, chosen by its own decision
        assert (model.info.backend, model.info.device) == ("fake", "tpu")
        assert any("the fake engine runs on tpu" in r for r in model.info.reasons)
        result = model.generate("ab", max_new_tokens=4)
        assert (result.text, result.finish_reason) == ("cdef", "length")
        assert "".join(model.stream("ab", max_new_tokens=4)) == "cdef"
        stream = model.stream_tokens("x", max_new_tokens=3, stop="z")
        assert [e.text for e in stream] == ["y", ""] and stream.result.finish_reason == "stop"
        scores = model.score("ab", ["c", "d"])
        assert scores[0] > scores[1]
    assert get_backend("counting").name == "fake"
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "fake" and info["would_run_on"]["backend"] == "fake" and info["tokenizer"] == "bytes"
    assert main(["doctor", "--json"]) == 0
    doctor = json.loads(capsys.readouterr().out)
    assert doctor["backends"]["fake"]["formats"] == ["fake"] and doctor["engines"]["fake TPUs"] == 1
    parser = build_parser()
    args = parser.parse_args(["run", str(folder), "hi", "--backend", "counting", "--device", "tpu"])
    assert (args.backend, args.device) == ("counting", "tpu")
    assert main(["run", str(folder), "ab", "--max-new-tokens", "3", "--device", "tpu"]) == 0
    assert capsys.readouterr().out.strip() == "cde"


def _imports(path: Path) -> list[str]:
    """The absolute module names a file imports (anywhere in it)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_runtime_reads_only_the_shared_parts_of_convert():
    """Layering: the converters never import the rest of pocketlm; the rest imports from the
    converters only their shared core, the registry, the checkpoint reader, their CLI and
    convert() itself."""
    allowed = {
        "pocketlm.converters",
        "pocketlm.converters.api",
        "pocketlm.converters.core",
        "pocketlm.converters.architectures",
        "pocketlm.converters.checkpoint",
        "pocketlm.converters.cli",
        "pocketlm.converters.synthetic",
    }
    for path in (ROOT / "runtime").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("pocketlm.converters"):
                module = "pocketlm.converters.core" if name.startswith("pocketlm.converters.core") else name
                assert module in allowed, f"{path.relative_to(ROOT)} imports {name}"
    for path in (ROOT / "convert").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[:2]
            assert top[0] != "pocketlm" or top == ["pocketlm", "converters"], f"{path.relative_to(ROOT)} imports {name}"


def test_python_m_convert_runs_without_the_runtime(tmp_path):
    code = (
        "import runpy, sys; sys.argv = ['convert', '--help']\n"
        "try:\n    runpy.run_module('pocketlm.converters', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "rest = [m for m in sys.modules if m.startswith('pocketlm.') and not m.startswith('pocketlm.converters')]\n"
        "print('RUNTIME' if rest else 'ALONE')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "architectures" in proc.stdout and proc.stdout.strip().endswith("ALONE")


def test_a_gguf_header_is_read_once_per_load_and_per_info(tmp_path, monkeypatch, capsys):
    import pocketlm.converters.core.gguf_file as gguf_file
    from pocketlm.cli.main import main
    from pocketlm.converters.synthetic import build_random_bloom

    path = convert(
        build_random_bloom(tmp_path / "hf", hidden=64, n_layer=1, n_head=4, vocab_size=512),
        tmp_path / "m.gguf",
        quant="q8_0",
    ).output
    reads = []
    real = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda c, keep: reads.append(c.path) or real(c, keep))
    with pocketlm.load(path):
        pass
    assert len(reads) == 1
    assert main(["info", str(path), "--json"]) == 0 and json.loads(capsys.readouterr().out)["format"] == "gguf"
    assert len(reads) == 2
