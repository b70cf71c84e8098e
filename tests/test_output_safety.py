"""What PocketLM writes never harms what it did not write, and a disk that refuses is one line.

- `--force` replaces a file, or a folder PocketLM wrote (its pocketlm.json says so); never
  another folder, never the input, nothing that holds it or lies inside it.
- Every OS error while writing an output, a manifest, the conversion cache or a download
  (full disk, read-only file system, file-size limit) is `pocketlm: error: <path>: cannot
  write it: <why>`, exit 1, and leaves no temporary behind.
- The cache's JSON (manifest.json, hashes.json, a model's pocketlm.json) of any shape or type
  is a broken entry: `run` rebuilds it with one warning, `list` shows it, `rm` removes it.

Read-only and full file systems are real tmpfs mounts when this process may mount (root);
the same write sites are also failed from inside the process (an OSError raised where the
file is written) and by a file-size limit (RLIMIT_FSIZE), which need no privilege.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_hub import FakeHub, folder_files

from pocketlm.converters import convert
from pocketlm.converters.core.errors import OutputExistsError, PocketLMError
from pocketlm.converters.core.jsonfile import Each, problem
from pocketlm.converters.synthetic import build_random_bloom


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "POCKETLM_"))}
    env.update(HF_HUB_DISABLE_TELEMETRY="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, cwd=None, **env):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment(**env),
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment(**env),
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc, *says):
    """Exit 1 and exactly one line on stderr, `pocketlm: error: ...`, holding every `says`."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), lines
    for words in says:
        assert str(words) in lines[0], (words, lines[0])
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder under `path` (None for folders), to compare later."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))} | {
        ".": None
    }


def leftovers(folder: Path) -> list[str]:
    """Temporaries PocketLM may write: *.partial, *.tmp, *.pocketlm-partial, *.incomplete."""
    suffixes = (".partial", ".tmp", ".pocketlm-partial", ".incomplete")
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(suffixes))


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    return build_random_bloom(tmp_path_factory.mktemp("safety") / "hf", hidden=64, n_layer=1, n_head=4, vocab_size=512)


@pytest.fixture(scope="module")
def gguf_f16(bloom):
    return convert(bloom, bloom.parent / "m-f16.gguf", quant="f16").output


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from reference import make_t5

    folder = tmp_path_factory.mktemp("safety-t5") / "t5"
    make_t5(folder)
    return folder


@pytest.fixture()
def precious(tmp_path):
    """A user's folder that is not a model: it must come through every command untouched."""
    folder = tmp_path / "precious"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(4096))
    return folder


# -- --force and where an output may go -----------------------------------------------------


def test_force_never_replaces_a_folder_pocketlm_did_not_write(tmp_path, bloom, gguf_f16, precious):
    before = snapshot(precious)
    one_line_error(run_cli("convert", bloom, "-o", precious, "--force"), precious, "a folder PocketLM did not write")
    one_line_error(run_cli("convert", bloom, "-o", precious), precious, "a folder PocketLM did not write")
    one_line_error(run_cli("quantize", gguf_f16, precious, "-q", "q8_0", "--force"), "did not write")
    with pytest.raises(OutputExistsError, match="did not write"):
        convert(bloom, precious, quant="f16", force=True)
    assert snapshot(precious) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temporary beside it


@pytest.mark.parametrize(
    "output, says",
    [
        ("{ckpt}", "this is the input"),
        ("{ckpt}/model.safetensors", "inside the input folder"),
        ("{ckpt}/config.json", "inside the input folder"),
        ("{ckpt}/new.gguf", "inside the input folder"),
        ("{ckpt}/..", "holds the input"),
        ("{parent}", "holds the input"),
    ],
)
def test_the_output_is_never_the_input_nor_holds_it_nor_lies_in_it(tmp_path, bloom, output, says):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bloom, ckpt)
    before = snapshot(tmp_path)
    out = output.format(ckpt=ckpt, parent=tmp_path)
    for force in (["--force"], []):
        one_line_error(run_cli("convert", ckpt, "-o", out, "--quant", "f16", *force), says)
    with pytest.raises(OutputExistsError, match=says):
        convert(ckpt, out, quant="f16", force=True)
    assert snapshot(tmp_path) == before


def test_quantize_refuses_its_own_input(tmp_path, gguf_f16):
    model = tmp_path / "m.gguf"
    shutil.copy(gguf_f16, model)
    before = model.read_bytes()
    for out in (model, tmp_path / "." / "m.gguf"):
        one_line_error(run_cli("quantize", model, out, "-q", "q8_0", "--force"), "this is the input")
    os.link(model, tmp_path / "hard.gguf")  # the same file under another name
    one_line_error(run_cli("quantize", model, tmp_path / "hard.gguf", "-q", "q8_0", "--force"), "this is the input")
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["hard.gguf", "m.gguf"]


@pytest.mark.parametrize("output", [".", "..", "./", "/", ""])
def test_dot_and_root_are_one_line_not_an_internal_error(tmp_path, bloom, output):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    for force in (["--force"], []):
        one_line_error(run_cli("convert", bloom, "-o", output, "--quant", "f16", *force, cwd=cwd))
    assert snapshot(tmp_path) == before


def test_force_replaces_a_file_only_once_the_new_one_is_complete(tmp_path, bloom, monkeypatch):
    import pocketlm.converters.api as api

    out = tmp_path / "m.gguf"
    out.write_bytes(b"the old model")
    real = api.WRITERS["gguf"]
    seen = []

    def watched(plan, tmp, job):
        seen.append(out.read_bytes())  # while the new one is written, the old one is still there
        return real(plan, tmp, job)

    monkeypatch.setitem(api.WRITERS, "gguf", watched)
    convert(bloom, out, quant="f16", force=True)
    assert seen == [b"the old model"] and out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    def failing(plan, tmp, job):
        real(plan, tmp, job)
        raise PocketLMError("the writer failed")

    monkeypatch.setitem(api.WRITERS, "gguf", failing)
    before = out.read_bytes()
    with pytest.raises(PocketLMError, match="the writer failed"):
        convert(bloom, out, quant="q8_0", force=True)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_force_replaces_a_folder_pocketlm_wrote_and_only_once_complete(tmp_path, t5, monkeypatch):
    import pocketlm.converters.api as api

    out = tmp_path / "m-ct2"
    convert(t5, out, quant="int8")
    assert json.loads((out / "pocketlm.json").read_text())["quant"] == "int8"
    one_line_error(run_cli("convert", t5, "-o", out, "--quant", "float32"), "already exists (use --force")
    old = snapshot(out)
    real = api.WRITERS["ct2"]
    seen = []

    def watched(plan, tmp, job):
        seen.append(snapshot(out))
        return real(plan, tmp, job)

    monkeypatch.setitem(api.WRITERS, "ct2", watched)
    convert(t5, out, quant="float32", force=True)
    assert seen == [old]
    assert json.loads((out / "pocketlm.json").read_text())["quant"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["m-ct2"]

    def failing(plan, tmp, job):
        real(plan, tmp, job)
        raise PocketLMError("the writer failed")

    monkeypatch.setitem(api.WRITERS, "ct2", failing)
    before = snapshot(out)
    with pytest.raises(PocketLMError, match="the writer failed"):
        convert(t5, out, quant="int8", force=True)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["m-ct2"]
    # a folder that only looks like one (pocketlm.json of another shape) is not PocketLM's
    (out / "pocketlm.json").write_text("[]")
    one_line_error(run_cli("convert", t5, "-o", out, "--force"), "a folder PocketLM did not write")


# -- a disk that refuses: real mounts when permitted ----------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (`ro`, `size=64k` ...); the test is skipped where mounting is
    not permitted (not root, or no CAP_SYS_ADMIN in a container)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])  # written here, and by llama.cpp's quantizer
def test_read_only_and_full_output_folders(tmp_path, bloom, quant):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = one_line_error(run_cli("convert", bloom, "-o", ro / "m.gguf", "--quant", quant))
        why = "the file system is read-only (nothing was left behind)"
        assert line == f"pocketlm: error: {ro / 'm.gguf'}: cannot write it: {why}"
    with tmpfs(tmp_path / "full", "size=64k") as full:
        one_line_error(
            run_cli("convert", bloom, "-o", full / "m.gguf", "--quant", quant), full / "m.gguf", "the disk is full"
        )
        assert list(full.iterdir()) == []


def test_read_only_and_full_quantize_and_ct2_outputs(tmp_path, gguf_f16, t5):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        one_line_error(run_cli("quantize", gguf_f16, ro / "q.gguf", "-q", "q4_k_m"), ro / "q.gguf", "read-only")
        one_line_error(run_cli("convert", t5, "-o", ro / "ct2"), ro / "ct2", "read-only")
    with tmpfs(tmp_path / "full", "size=64k") as full:
        one_line_error(run_cli("quantize", gguf_f16, full / "q.gguf", "-q", "q4_k_m"), "the disk is full")
        one_line_error(run_cli("convert", t5, "-o", full / "ct2", "--quant", "float32"), "the disk is full")
        assert list(full.iterdir()) == []


def test_batch_output_on_read_only_and_full_disks(tmp_path, gguf_f16):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Bonjour."}\n')
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        run = run_cli("run", gguf_f16, "--input", prompts, "--output", ro / "a.jsonl", "--max-new-tokens", "2")
        one_line_error(run, ro / "a.jsonl", "read-only")
    with tmpfs(tmp_path / "full", "size=4k") as full:
        (full / "filler").write_bytes(b"x" * 4096)
        run = run_cli("run", gguf_f16, "--input", prompts, "--output", full / "a.jsonl", "--max-new-tokens", "2")
        one_line_error(run, full / "a.jsonl", "the disk is full")
        assert [p.name for p in full.iterdir()] == ["filler"]  # no empty answers file either


def test_cache_on_read_only_and_full_disks(tmp_path, bloom):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        proc = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=ro / "cache")
        one_line_error(proc, ro / "cache", "read-only", "POCKETLM_CACHE")
    with tmpfs(tmp_path / "full", "size=64k") as full:  # below the ~93 KB q4_k_m output
        proc = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=full / "cache")
        one_line_error(proc, "the disk is full")
        converted = full / "cache" / "converted"
        assert [p.name for p in converted.iterdir() if not p.name.endswith(".lock")] == [] and not leftovers(full)


def test_a_read_only_cache_still_serves_its_entries_and_rm_says_why_it_cannot(tmp_path, bloom):
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        cache = disk / "cache"
        first = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", "--json", POCKETLM_CACHE=cache)
        assert first.returncode == 0, first.stderr
        remount(disk, "ro")
        try:
            again = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", "--json", POCKETLM_CACHE=cache)
            assert again.returncode == 0 and json.loads(again.stdout)["text"] == json.loads(first.stdout)["text"]
            listing = run_cli("list", "--json", POCKETLM_CACHE=cache)
            assert listing.returncode == 0 and len(json.loads(listing.stdout)) == 1
            key = json.loads(listing.stdout)[0]["key"]
            before = snapshot(cache)
            one_line_error(run_cli("rm", key[:8], POCKETLM_CACHE=cache), key, "cannot remove it", "read-only")
            assert snapshot(cache) == before
        finally:
            remount(disk, "rw")


def test_hub_downloads_on_read_only_and_full_disks(tmp_path, bloom):
    """A weight file cut short by a full disk is kept for the next command to resume (as a
    download cut short by the network is), and the line says so; nothing else is left."""
    with FakeHub() as hub:
        hub.add("tiny/bloom", folder_files(bloom))
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "POCKETLM_HUB_TIMEOUT": "5"}
        with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
            for args in (["pull", "tiny/bloom"], ["run", "tiny/bloom", "Bonjour."]):
                one_line_error(run_cli(*args, HF_HOME=ro / "hf", **env), ro / "hf", "cannot write it", "read-only")
        with tmpfs(tmp_path / "full", "size=100k") as full:
            for args in (["pull", "tiny/bloom"], ["run", "tiny/bloom", "Bonjour."]):
                line = one_line_error(run_cli(*args, HF_HOME=full / "hf", **env), "cannot write it: the disk is full")
                assert ".pocketlm-partial" not in line or "the same command resumes" in line, line
            kept = leftovers(full)
            assert all(k.endswith(".pocketlm-partial") for k in kept), kept
            remount(full, "size=4m")  # room again: the same command finishes the download
            assert run_cli("pull", "tiny/bloom", HF_HOME=full / "hf", **env).returncode == 0
            assert not leftovers(full)


# -- the same write sites, failed from inside the process (no privilege needed) --------------

FAIL_WRITES = """
    import errno, os, pathlib, sys
    real = pathlib.Path.{method}

    def failing(self, *args, **kwargs):
        if self.name == {name!r}:
            real(self, args[0][: len(args[0]) // 2])  # half written, then the disk refuses
            raise OSError(errno.{errno}, os.strerror(errno.{errno}))
        return real(self, *args, **kwargs)

    pathlib.Path.{method} = failing
    from pocketlm.cli.main import main
    sys.exit(main({args!r}))
"""


@pytest.mark.parametrize(
    "code, says",
    [
        ("ENOSPC", "the disk is full"),
        ("EROFS", "the file system is read-only"),
        ("EDQUOT", "the disk quota is exceeded"),
    ],
)
def test_manifest_write_failure_is_one_line_and_keeps_no_half_entry(tmp_path, bloom, code, says):
    cache = tmp_path / "cache"
    args = ["run", str(bloom), "Bonjour.", "--max-new-tokens", "2"]
    script = FAIL_WRITES.format(method="write_text", name="manifest.json.tmp", errno=code, args=args)
    proc = python(script, POCKETLM_CACHE=cache)
    one_line_error(proc, f"manifest.json: cannot write it: {says} (the conversion was not kept)")
    entries = [p for p in (cache / "converted").iterdir() if not p.name.endswith(".lock")]
    assert entries == [] and not leftovers(cache)
    assert run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache).returncode == 0


def test_cache_folder_that_cannot_be_written_is_one_line(tmp_path, bloom):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    proc = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    one_line_error(proc, cache / "converted", "cannot write it", "POCKETLM_CACHE")
    assert cache.read_text() == "a file where the cache folder should be"


def test_file_size_limit_in_the_cache_is_one_line_and_leaves_nothing(tmp_path, bloom):
    """RLIMIT_FSIZE makes writes past the limit fail with EFBIG (what a full disk does to a
    process that writes), with no privilege; the model in the cache is bigger than the limit."""
    cache = tmp_path / "cache"
    code = f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        from pocketlm.cli.main import main
        sys.exit(main(["run", {str(bloom)!r}, "Bonjour.", "--max-new-tokens", "2"]))
    """
    one_line_error(python(code, POCKETLM_CACHE=cache), "model.gguf: cannot write it: the file is too large")
    assert [p for p in (cache / "converted").iterdir() if not p.name.endswith(".lock")] == []
    assert not leftovers(cache)


def test_download_write_failure_is_one_line_not_a_network_fault(tmp_path, bloom):
    """A weight file the disk cannot take: one line naming it, no retries blamed on the Hub."""
    with FakeHub() as hub:
        hub.add("tiny/bloom", folder_files(bloom))
        code = """
            import builtins, errno, os, sys
            import pocketlm.loading.hub as hub
            def failing_open(path, mode="r", *args, **kwargs):
                if str(path).endswith(".pocketlm-partial") and ("w" in mode or "a" in mode):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return builtins.open(path, mode, *args, **kwargs)
            hub.open = failing_open
            from pocketlm.cli.main import main
            sys.exit(main(["pull", "tiny/bloom"]))
        """
        proc = python(code, HF_HOME=tmp_path / "hf", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
        one_line_error(proc, ".pocketlm-partial: cannot write it: the disk is full")
        assert "interrupted" not in proc.stderr and "resuming" not in proc.stderr
        assert sum(1 for _, path, _ in hub.requests if path.endswith("model.safetensors")) <= 2  # HEAD + one GET


# -- the cache's JSON of any shape ---------------------------------------------------------


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, bloom):
    cache = tmp_path_factory.mktemp("warm") / "cache"
    proc = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    assert proc.returncode == 0, proc.stderr
    return cache


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "converted").iterdir() if p.is_dir()]
    return entry


MANIFESTS = {
    "an array": b"[]",
    "null": b"null",
    "not JSON": b'{"output": ',
    "not UTF-8": b"\xff\xfe\x00{",
    "output a number": json.dumps({"output": 5, "output_sha256": "0" * 64}).encode(),
    "output outside the entry": json.dumps({"output": "../../hashes.json", "output_sha256": "0" * 64}).encode(),
    "no output_sha256": json.dumps({"output": "model.gguf"}).encode(),
    "source an array": None,  # the real manifest with "source": []
    "sha256 of numbers": None,  # the real manifest with "source": {"sha256": {"config.json": 1}}
    "quant an object": None,  # the real manifest with "quant": {}
}


def _broken_manifest(kind: str, real: dict) -> bytes:
    if MANIFESTS[kind] is not None:
        return MANIFESTS[kind]
    changed = dict(real)
    if kind == "source an array":
        changed["source"] = []
    elif kind == "sha256 of numbers":
        changed["source"] = {**real["source"], "sha256": {"config.json": 1}}
    else:
        changed["quant"] = {}
    return json.dumps(changed).encode()


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_malformed_manifest_is_a_broken_entry_that_run_rebuilds_and_rm_removes(tmp_path, bloom, warm_cache, kind):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    entry = _entry(cache)
    manifest = entry / "manifest.json"
    real = json.loads(manifest.read_text())
    manifest.write_bytes(_broken_manifest(kind, real))

    listing = run_cli("list", POCKETLM_CACHE=cache)
    assert listing.returncode == 0 and not listing.stderr, listing.stderr
    assert f"{entry.name[:12]}  broken: {manifest}" in listing.stdout, listing.stdout
    rows = json.loads(run_cli("list", "--json", POCKETLM_CACHE=cache).stdout)
    assert len(rows) == 1 and rows[0]["broken"] and rows[0]["key"] == entry.name

    run = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    assert run.returncode == 0, run.stderr
    warnings = run.stderr.strip().splitlines()
    assert len(warnings) == 1 and "is broken" in warnings[0] and "rebuilding it" in warnings[0], warnings
    assert json.loads(manifest.read_text())["output_sha256"] == real["output_sha256"]  # rebuilt, the same

    manifest.write_bytes(_broken_manifest(kind, real))
    removed = run_cli("rm", entry.name[:8], POCKETLM_CACHE=cache)
    assert removed.returncode == 0 and f"removed {entry.name[:12]} (broken)" in removed.stdout, removed.stderr
    assert not entry.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b"null",
        b"7",
        b'{"x": 1',
        b"\xff\xfe",
        b'{"KEY": 1}',
        b'{"KEY": {"size": "1", "mtime_ns": 2, "sha256": "x"}}',
    ],
)
def test_malformed_hashes_json_is_rehashed_and_rewritten(tmp_path, bloom, warm_cache, content):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    content = content.replace(b"KEY", str((bloom / "config.json").resolve()).encode())
    (cache / "hashes.json").write_bytes(content)
    for command in (["list"], ["run", bloom, "Bonjour.", "--max-new-tokens", "2"]):
        proc = run_cli(*command, POCKETLM_CACHE=cache)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    run = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr  # rewritten whole: no warning now
    assert isinstance(json.loads((cache / "hashes.json").read_text()), dict)


def test_malformed_hashes_json_warns_in_one_line(tmp_path, bloom, warm_cache):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    (cache / "hashes.json").write_text("[]")
    run = run_cli("run", bloom, "Bonjour.", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"WARNING pocketlm.loading.cache: {cache / 'hashes.json'}: expected an object, found an array; "
        "the files it remembered are hashed again"
    ]


def test_malformed_pocketlm_json_in_a_cached_ct2_entry_is_rebuilt(tmp_path, t5):
    cache = tmp_path / "cache"
    first = run_cli("run", t5, "--ids", "1,2,3", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
    assert first.returncode == 0, first.stderr
    meta = _entry(cache) / "model-ct2" / "pocketlm.json"
    real = meta.read_bytes()
    for content in (b"[]", b'{"tokenizer": 5}', b"\xff"):
        meta.write_bytes(content)
        assert run_cli("list", POCKETLM_CACHE=cache).returncode == 0
        run = run_cli("run", t5, "--ids", "1,2,3", "--max-new-tokens", "2", POCKETLM_CACHE=cache)
        assert run.returncode == 0, run.stderr
        warnings = run.stderr.strip().splitlines()
        assert len(warnings) == 1 and "rebuilding it" in warnings[0], warnings
        assert meta.read_bytes() == real
    meta.write_bytes(b"[]")
    removed = run_cli("rm", _entry(cache).name[:8], POCKETLM_CACHE=cache)
    assert removed.returncode == 0 and not (cache / "converted" / meta.parent.parent.name).exists()


@pytest.mark.parametrize("content", [b"[]", b'{"tokenizer": 5}', b'{"source": "x"}', b'{"eos_token_id": "1"}', b"{"])
def test_malformed_pocketlm_json_in_a_model_folder_is_one_line(tmp_path, t5, content):
    folder = tmp_path / "m-ct2"
    convert(t5, folder)
    (folder / "pocketlm.json").write_bytes(content)
    for args in (["run", folder, "--ids", "1,2", "--max-new-tokens", "2"], ["info", folder]):
        one_line_error(run_cli(*args), folder / "pocketlm.json", "malformed model metadata")


def test_json_shapes_are_checked_field_by_field():
    shape = {"output": str, "size?": int, "source?": {"repo?": (str, type(None)), "sha256?": Each(str)}}
    assert problem({"output": "m"}, shape) is None
    assert problem({"output": "m", "source": {"repo": None, "sha256": {"a": "b"}}}, shape) is None
    assert problem([], shape) == "expected an object, found an array"
    assert problem({}, shape) == "output is missing"
    assert problem({"output": "m", "size": True}, shape) == "size: expected an integer, found a boolean"
    assert problem({"output": "m", "size": 1.5}, shape) == "size: expected an integer, found a number"
    assert (
        problem({"output": "m", "source": {"repo": 1}}, shape)
        == "source.repo: expected a string or null, found an integer"
    )
    assert (
        problem({"output": "m", "source": {"sha256": {"a": 1}}}, shape)
        == "source.sha256.a: expected a string, found an integer"
    )
