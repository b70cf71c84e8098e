"""Hub ids: pull only what is needed, cache, offline, revision pins, GGUF repos, corrupted cache.

A fake hub on loopback (tests/fake_hub.py) stands in for huggingface.co: every command runs
in a subprocess with HF_ENDPOINT pointed at it and HF_HOME in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fake_hub import FakeHub, folder_files

from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom


@pytest.fixture(scope="module")
def bloom_files(tmp_path_factory):
    folder = build_random_bloom(
        tmp_path_factory.mktemp("hubsrc") / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2
    )
    return folder, folder_files(folder)


@pytest.fixture()
def hub(tmp_path, bloom_files):
    folder, files = bloom_files
    with FakeHub() as hub:
        hub.add("tiny/bloom", {**files, "pytorch_model.bin": b"never fetched", "README.md": b"# tiny"})
        ggufs = {}
        for quant in ("q4_k_m", "q8_0", "f16"):
            out = convert(folder, tmp_path / f"bloom.{quant.upper()}.gguf", quant=quant).output
            ggufs[f"bloom.{quant.upper()}.gguf"] = open(out, "rb").read()
        hub.add("tiny/bloom-gguf", {**ggufs, "README.md": b"# gguf"})
        yield hub


def env(tmp_path, hub, **extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "POCKETLM_"))}
    e.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    e.update(extra)
    return e


def run_cli(env_vars, *args):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True, env=env_vars, timeout=600
    )


def python(env_vars, code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env_vars, timeout=600
    )


def test_run_by_hub_id_pulls_only_one_weight_format_then_works_offline(tmp_path, hub):
    e = env(tmp_path, hub)
    first = run_cli(e, "run", "tiny/bloom", "Bonjour.", "--max-new-tokens", "6", "--json")
    assert first.returncode == 0, first.stderr
    fetched = set(hub.downloads("tiny/bloom"))
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= fetched
    assert "pytorch_model.bin" not in fetched and "README.md" not in fetched
    answer = json.loads(first.stdout)["text"]
    # the converted model is cached next to the hub cache, with a manifest
    listing = json.loads(run_cli(e, "list", "--json").stdout)
    assert len(listing) == 1 and listing[0]["source"].startswith("tiny/bloom@") and listing[0]["quant"] == "q4_k_m"
    assert listing[0]["path"].startswith(str(tmp_path / "hf" / "pocketlm"))
    # offline: same answer, and not a single request reaches the hub
    before = len(hub.requests)
    offline = run_cli(
        env(tmp_path, hub, HF_HUB_OFFLINE="1"), "run", "tiny/bloom", "Bonjour.", "--max-new-tokens", "6", "--json"
    )
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["text"] == answer
    assert len(hub.requests) == before


def test_offline_without_cache_says_what_is_missing(tmp_path, hub):
    proc = run_cli(env(tmp_path, hub, HF_HUB_OFFLINE="1"), "run", "tiny/bloom", "Bonjour.")
    assert proc.returncode == 1 and not hub.requests
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "tiny/bloom is not available here" in line
    assert "pocketlm pull tiny/bloom" in line and "models--tiny--bloom" in line


def test_unknown_repo_and_revision_are_one_line_errors(tmp_path, hub):
    e = env(tmp_path, hub)
    missing = run_cli(e, "pull", "tiny/nothing")
    assert (
        missing.returncode == 1 and "no such model on the Hub" in missing.stderr and "Traceback" not in missing.stderr
    )
    bad_rev = run_cli(e, "pull", "tiny/bloom@v9")
    assert bad_rev.returncode == 1 and "no such revision" in bad_rev.stderr


def test_revision_pin_is_honoured(tmp_path, hub, bloom_files):
    _, files = bloom_files
    config = json.loads(files["config.json"])
    config["layer_norm_epsilon"] = 1e-3
    old = hub.add("tiny/bloom", {**files, "config.json": json.dumps(config).encode()}, ref="v1")
    e = env(tmp_path, hub)
    pulled = run_cli(e, "pull", "tiny/bloom@v1")
    assert pulled.returncode == 0, pulled.stderr
    folder = pulled.stdout.strip().splitlines()[-1]
    assert (
        folder.endswith(old)
        and json.loads(open(os.path.join(folder, "config.json")).read())["layer_norm_epsilon"] == 1e-3
    )
    main = run_cli(e, "pull", "tiny/bloom").stdout.strip().splitlines()[-1]
    assert main != folder


def test_gguf_repo_downloads_one_file(tmp_path, hub):
    e = env(tmp_path, hub)
    chosen = run_cli(e, "pull", "tiny/bloom-gguf", "--quant", "q8_0")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip().endswith("bloom.Q8_0.gguf")
    assert hub.downloads("tiny/bloom-gguf") == ["bloom.Q8_0.gguf"]
    default = run_cli(e, "run", "tiny/bloom-gguf", "Bonjour.", "--max-new-tokens", "3", "--json")
    assert default.returncode == 0, default.stderr
    assert "using q4_k_m" in default.stderr and "bloom.Q4_K_M.gguf" in hub.downloads("tiny/bloom-gguf")
    assert "bloom.F16.gguf" not in hub.downloads("tiny/bloom-gguf")
    wrong = run_cli(e, "pull", "tiny/bloom-gguf", "--quant", "q2_k")
    assert wrong.returncode == 1 and "no q2_k GGUF file; available: f16, q4_k_m, q8_0" in wrong.stderr


def test_interrupted_download_resumes(tmp_path, hub):
    """A 16 MB file cut off 1 MB before its end: the retry must ask only for the rest (a
    Range request)."""
    data = os.urandom(16 << 20)
    hub.add("tiny/big", {"config.json": b"{}", "model.safetensors": data})
    hub.flaky.add("tiny/big/model.safetensors")
    proc = run_cli(env(tmp_path, hub), "pull", "tiny/big")
    gets = [r for m, p, r in hub.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(gets) == 2 and gets[0] is None and gets[1] and gets[1].startswith("bytes=") and gets[1] != "bytes=0-", (
        gets
    )
    assert "interrupted" in proc.stderr and "resuming at" in proc.stderr
    folder = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None
    # a folder without tokenizer/weights we know is still pulled; its bytes must be intact
    assert folder and open(os.path.join(folder, "model.safetensors"), "rb").read() == data


def test_corrupted_cached_conversion_is_rebuilt(tmp_path, hub):
    e = env(tmp_path, hub)
    assert run_cli(e, "run", "tiny/bloom", "Bonjour.", "--max-new-tokens", "2").returncode == 0
    entry = json.loads(run_cli(e, "list", "--json").stdout)[0]
    with open(entry["path"] + "/model.gguf", "r+b") as f:  # flip bytes in the middle of the file
        f.seek(os.path.getsize(entry["path"] + "/model.gguf") // 2)
        f.write(b"\xff" * 64)
    again = run_cli(e, "run", "tiny/bloom", "Bonjour.", "--max-new-tokens", "2")
    assert again.returncode == 0, again.stderr
    assert "does not match its manifest" in again.stderr
    manifest = json.loads(open(entry["path"] + "/manifest.json").read())
    check = python(
        e,
        f"""
        from pathlib import Path
        from pocketlm.loading.cache import _HashMemo, output_sha256
        print(output_sha256(Path({entry["path"]!r}) / "model.gguf", _HashMemo()))
    """,
    )
    assert check.stdout.strip() == manifest["output_sha256"]


def test_list_and_rm(tmp_path, hub):
    e = env(tmp_path, hub)
    assert run_cli(e, "pull", "tiny/bloom", "--convert").returncode == 0
    listing = run_cli(e, "list")
    assert "tiny/bloom@" in listing.stdout and "MiB" in listing.stdout
    for too_short in ("", listing.stdout[:1], listing.stdout[:3]):  # `rm ""` matched every key
        assert run_cli(e, "rm", too_short).returncode == 1
    assert "tiny/bloom@" in run_cli(e, "list").stdout
    removed = run_cli(e, "rm", "tiny/bloom")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert json.loads(run_cli(e, "list", "--json").stdout) == []
    assert run_cli(e, "rm", "tiny/bloom").returncode == 1
