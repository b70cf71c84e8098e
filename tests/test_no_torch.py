"""convert/ and runtime/ never import torch or transformers, even when they are installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys

    class Forbidden:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"forbidden import: {name}")

    sys.meta_path.insert(0, Forbidden())
    """
)


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )


def test_full_pipeline_without_torch(tmp_path):
    code = f"""
    from pathlib import Path
    from convert import convert
    from convert.synthetic import build_random_bloom
    import runtime

    folder = build_random_bloom(Path({str(tmp_path)!r}) / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    for quant in ("f32", "q8_0", "q4_k_m"):
        summary = convert(folder, Path({str(tmp_path)!r}) / f"m-{{quant}}.gguf", quant=quant)
        with runtime.load(summary.output, n_ctx=128) as model:
            ids = model.tokenize("Translate to English: Je t'aime.")
            result = model.generate("Translate to English: Je t'aime.", max_new_tokens=8)
            assert len(result.token_ids) >= 1, result
            assert model.logits(ids).shape == (len(ids), 512)
            assert "".join(model.stream(ids, max_new_tokens=8)) == model.generate(ids, max_new_tokens=8).text
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    print("OK")
    """
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_cli_and_main_job_without_torch(tmp_path):
    code = f"""
    from pathlib import Path
    from convert.synthetic import build_random_bloom
    from runtime import demo
    from runtime.cli import main

    folder = build_random_bloom(Path({str(tmp_path)!r}) / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    out = str(Path({str(tmp_path)!r}) / "m.gguf")
    assert main(["convert", str(folder), "-o", out, "--quant", "q8_0"]) == 0
    assert main(["run", out, "Bonjour.", "-n", "4"]) == 0
    assert main(["info", out, "--json"]) == 0
    assert demo.main([]) == 0
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    """
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[synthetic] answer:" in proc.stdout
