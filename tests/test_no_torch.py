"""convert/ and runtime/ never import torch or transformers (nor sentencepiece), even when they are installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys

    FORBIDDEN = tuple(sys.argv[1:])  # top-level package names

    class Forbidden:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"forbidden import: {name}")

    sys.meta_path.insert(0, Forbidden())
    """
)


def _run(code: str, tmp_path, forbidden: tuple[str, ...] = ("torch", "transformers")) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *forbidden],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


def test_full_pipeline_without_torch(tmp_path):
    code = f"""
    from pathlib import Path
    from pocketlm.converters import convert
    from pocketlm.converters.synthetic import build_random_bloom
    import pocketlm

    folder = build_random_bloom(Path({str(tmp_path)!r}) / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    for quant in ("f32", "q8_0", "q4_k_m"):
        summary = convert(folder, Path({str(tmp_path)!r}) / f"m-{{quant}}.gguf", quant=quant)
        with pocketlm.load(summary.output, n_ctx=128) as model:
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
    from pocketlm.converters.synthetic import build_random_bloom
    from pocketlm.cli import demo
    from pocketlm.cli.main import main

    folder = build_random_bloom(Path({str(tmp_path)!r}) / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    out = str(Path({str(tmp_path)!r}) / "m.gguf")
    assert main(["convert", str(folder), "-o", out, "--quant", "q8_0"]) == 0
    assert main(["run", out, "Bonjour.", "--max-new-tokens", "4"]) == 0
    assert main(["info", out, "--json"]) == 0
    assert demo.main([]) == 0
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    """
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[synthetic] answer:" in proc.stdout


def test_t5_ct2_path_never_imports_torch_even_when_installed(tmp_path):
    """No import blocker here: torch and transformers are importable, and must stay unimported."""
    from reference import make_t5, make_t5_tokenizer
    from test_t5_tokenizer import CORPUS

    tok = make_t5_tokenizer(tmp_path / "spm", CORPUS, pieces=180)
    make_t5(tmp_path / "hf", vocab=300, tokenizer_files={"tokenizer.json": tok["tokenizer.json"]})
    code = f"""
    import sys
    from pathlib import Path
    from pocketlm.converters import convert
    from pocketlm.converters.synthetic import build_random_bloom
    import pocketlm

    root = Path({str(tmp_path)!r})
    for quant in ("int8", "float32"):
        summary = convert(root / "hf", root / f"ct2-{{quant}}", quant=quant)
        with pocketlm.load(summary.output) as model:
            assert model.generate("Translate to English: Je t'aime.", max_new_tokens=5).token_ids
            assert model.score("Is it good?", ["yes", "no"])
    bloom = build_random_bloom(root / "bloom", hidden=64, n_layer=1, n_head=4, vocab_size=512)
    with pocketlm.load(convert(bloom, root / "b.gguf", quant="q8_0").output) as model:
        model.generate("Bonjour.", max_new_tokens=3)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_spiece_only_t5_without_sentencepiece(tmp_path, t5_tokenizer_files, hf_t5_tokenizer):
    """A checkpoint whose only tokenizer file is spiece.model converts (CTranslate2 and GGUF) and
    tokenizes like Hugging Face with sentencepiece (and torch, transformers) unimportable; so do
    older CTranslate2 folders that name spiece.model as their tokenizer."""
    from reference import make_t5
    from test_t5_tokenizer import CORPUS, PIECES

    make_t5(tmp_path / "hf", vocab=PIECES + 120, tokenizer_files={"spiece.model": t5_tokenizer_files["spiece.model"]})
    expected = {text: hf_t5_tokenizer(text)["input_ids"] for text in CORPUS + ["The <extra_id_0> walks </s>"]}
    code = f"""
    import json, shutil
    from pathlib import Path
    from pocketlm.converters import convert
    import pocketlm

    root, expected = Path({str(tmp_path)!r}), {expected!r}
    ct2 = Path(convert(root / "hf", root / "ct2", quant="int8").output)
    info = json.loads((ct2 / "pocketlm.json").read_text())
    assert info["tokenizer"] == "tokenizer.json"
    old = shutil.copytree(ct2, root / "old")  # as converted before tokenizer.json was built
    shutil.copy(root / "hf" / "spiece.model", old / "spiece.model")
    (old / "tokenizer.json").unlink()
    (old / "pocketlm.json").write_text(json.dumps({{**info, "tokenizer": "spiece.model"}}))
    for folder in (ct2, old):
        with pocketlm.load(folder) as model:
            for text, ids in expected.items():
                assert model.tokenize(text) == ids, (folder, text)
            assert model.generate("Translate to English: Je t'aime.", max_new_tokens=3).token_ids
    assert convert(root / "hf", root / "m.gguf", format="gguf", quant="q8_0").output
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    assert not leaked, leaked
    print("OK")
    """
    proc = _run(code, tmp_path, forbidden=("torch", "transformers", "sentencepiece"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
