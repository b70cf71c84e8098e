"""Every subcommand against the bad inputs users give it: one line, a non-zero exit, no traceback.

Each row is (subcommand and arguments, exit code, words the message must hold). Exit 1 rows
must print exactly one line, `pocketlm: error: ...`, naming the file or value at fault; exit 2
rows are argparse's usage errors. Placeholders in the arguments are filled per test: {gguf} a
good model, {missing} a path that does not exist, {dir} an empty folder, {text} a text file,
{empty} an empty file, {locked} a file this process cannot read, {busy} a port in use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
from fake_hub import FakeHub, folder_files

from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom

CASES = [
    # missing file
    ("convert {missing} -o {out}/x.gguf", 1, "missing: not a folder"),
    ("quantize {missing} {out}/x.gguf", 1, "missing"),
    ("run {missing} hi", 1, "missing"),
    ("info {missing}", 1, "missing"),
    ("serve {missing} --port 0", 1, "missing"),
    ("run {gguf} --input {missing} --output {out}/a.jsonl", 1, "missing"),
    # directory instead of file
    ("quantize {dir} {out}/x.gguf", 1, "empty-dir"),
    ("run {dir} hi", 1, "empty-dir"),
    ("info {dir}", 1, "empty-dir"),
    ("serve {dir} --port 0", 1, "empty-dir"),
    ("convert {gguf} -o {out}/x.gguf", 1, "not a folder"),
    ("run {gguf} --input {dir} --output {out}/a.jsonl", 1, "empty-dir"),
    ("run {gguf} --input {prompts} --output {dir}", 1, "empty-dir"),
    ("quantize {gguf} {dir} --quant q4_0", 1, "empty-dir"),
    # unreadable file
    ("run {locked} hi", 1, "locked.gguf"),
    ("info {locked}", 1, "locked.gguf"),
    ("quantize {locked} {out}/x.gguf", 1, "locked.gguf"),
    ("convert {locked_folder} -o {out}/x.gguf", 1, "config.json"),
    ("run {gguf} --input {locked} --output {out}/a.jsonl", 1, "locked.gguf"),
    # wrong format
    ("run {text} hi", 1, "notes.txt"),
    ("info {text}", 1, "notes.txt"),
    ("quantize {text} {out}/x.gguf", 1, "notes.txt"),
    ("serve {text} --port 0", 1, "notes.txt"),
    ("convert {gpt2} -o {out}/x.gguf", 1, "GPT2LMHeadModel"),
    ("convert {bad_json} -o {out}/x.gguf", 1, "config.json"),
    ("run {gguf} --input {text} --output {out}/a.jsonl", 1, "notes.txt:1"),
    # empty file
    ("run {empty} hi", 1, "empty.gguf"),
    ("info {empty}", 1, "empty.gguf"),
    ("quantize {empty} {out}/x.gguf", 1, "empty.gguf"),
    ("convert {empty_config} -o {out}/x.gguf", 1, "config.json"),
    # hub id that does not exist, bad revision
    ("pull tiny/nothing", 1, "tiny/nothing: no such model on the Hub"),
    ("run tiny/nothing hi", 1, "tiny/nothing: no such model on the Hub"),
    ("info tiny/nothing", 1, "tiny/nothing: no such model on the Hub"),
    ("pull tiny/bloom@v9", 1, "tiny/bloom@v9: no such revision"),
    ("run tiny/bloom@v9 hi", 1, "tiny/bloom@v9: no such revision"),
    ("pull not-a-repo-id", 1, "is not a Hub id"),
    # port in use
    ("serve {gguf} --port {busy}", 1, "port {busy}"),
    # invalid values
    ("run {gguf} hi --top-p 2", 1, "top_p"),
    ("run {gguf} hi --max-new-tokens -1", 1, "max_new_tokens"),
    ("run {gguf} hi -n 0", 1, "num_return_sequences"),
    ("run {gguf} hi --num-beams 2 --temperature 0.8", 1, "temperature 0"),
    ("run {gguf} hi --temperature -1", 1, "temperature"),
    ("run {gguf} hi --threads 0", 1, "threads"),
    ("run {gguf} hi --ctx -5", 1, "ctx"),
    ("run {gguf} hi --backend ctranslate2", 1, "ctranslate2"),
    ("run {gguf} --ids 1,x", 1, "--ids"),
    ("run {gguf} --input {prompts}", 1, "--input and --output go together"),
    ("run {gguf} --input {prompts} --output {out}/a.jsonl --batch-size 0", 1, "batch"),
    ("run {gguf} --input {prompts} --output {out}/a.jsonl --actors 2", 1, "--actors goes with --ray"),
    ("run {gguf} --input {prompts} --output {out}/a.jsonl --ray 127.0.0.1:1", 1, "127.0.0.1:1: cannot connect"),
    ("run {out}/missing.gguf --input {prompts} --output {out}/a.jsonl --ray", 1, "no such file"),
    ("run {gguf} --input {prompts} --output {out}/a.jsonl --ray --actors 0", 1, "--actors 0"),
    ("serve {gguf} --port 70000", 1, "70000"),
    ("serve {gguf} --port 0 --max-queue -1", 1, "queue"),
    ("convert {hf} -o {out}/x.gguf --quant q9", 1, "unknown GGUF quant type"),
    ("convert {hf} -o {gguf}", 1, "already exists"),
    ("rm nothing-like-this", 1, "nothing in the cache matches"),
    ("embed {missing} --ids 1", 1, "missing"),
    ("embed {dir} --ids 1", 1, "empty-dir"),
    ("embed {text} --ids 1", 1, "notes.txt"),
    ("embed {empty} --ids 1", 1, "empty.gguf"),
    ("embed {locked} --ids 1", 1, "locked.gguf"),
    ("embed {gguf}", 1, "nothing to embed"),
    ("embed {gguf} --ids 1,x", 1, "--ids"),
    ("embed {gguf} --ids 1 --ids 2,99999", 1, "input 1: token id 99999 is outside the vocabulary"),
    ("embed {gguf} --ids 1 --batch-size 0", 1, "--batch-size 0"),
    ("embed tiny/nothing --ids 1", 1, "tiny/nothing: no such model on the Hub"),
    ("eval {missing} --tasks arc_easy", 1, "missing"),
    ("eval {gguf} --tasks no_such_task", 1, "unknown task: no_such_task"),
    ("eval {gguf} --tasks arc_easy --include-path {missing}", 1, "not a folder"),
    ("eval {gguf} --tasks arc_easy --batch-size 0", 1, "--batch-size 0"),
    ("eval {gguf} --tasks arc_easy --limit 0", 1, "--limit 0"),
    ("eval {gguf}", 2, "required"),
    # command-line syntax: argparse's usage errors
    ("run {gguf} hi --temperature warm", 2, "invalid float value"),
    ("run {gguf} hi --device tpu", 2, "invalid choice"),
    ("run {gguf} hi --no-such-flag", 2, "unrecognized arguments"),
    ("frobnicate", 2, "invalid choice"),
    ("convert", 2, "required"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    hf = build_random_bloom(root / "hf", hidden=64, n_layer=1, n_head=4, vocab_size=512)
    paths = {
        "hf": hf,
        "gguf": convert(hf, root / "m-f16.gguf", quant="f16").output,
        "out": root / "out",
        "missing": root / "missing",
        "dir": root / "empty-dir",
        "text": root / "notes.txt",
        "empty": root / "empty.gguf",
        "locked": root / "locked.gguf",
        "prompts": root / "prompts.jsonl",
    }
    paths["out"].mkdir()
    paths["dir"].mkdir()
    paths["text"].write_text("hello, not a model\n")
    paths["empty"].write_bytes(b"")
    paths["prompts"].write_text('{"prompt": "hi"}\n')
    shutil.copy(paths["gguf"], paths["locked"])
    for name, config in {
        "gpt2": '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}',
        "bad_json": '{"architectures": [',
        "empty_config": "",
        "locked_folder": "{}",
    }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
        paths[name] = root / name
    os.chmod(paths["locked"], 0)
    os.chmod(paths["locked_folder"] / "config.json", 0)
    return paths


@pytest.fixture(scope="module")
def hub(files):
    with FakeHub() as hub:
        hub.add("tiny/bloom", folder_files(files["hf"]))
        yield hub


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def unprivileged() -> list[str]:
    """A prefix that makes file permissions apply: root reads a mode-000 file otherwise."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("args, code, says", CASES, ids=[c[0].split(" {")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line(tmp_path, files, hub, busy_port, args, code, says):
    values = {k: str(v) for k, v in files.items()} | {"busy": str(busy_port)}
    argv = [part.format(**values) for part in args.split()]
    prefix = unprivileged() if "{locked" in args else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "POCKETLM_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", POCKETLM_HUB_TIMEOUT="5")
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "pocketlm", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    says = says.format(**values)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), lines
    else:
        assert lines[0].startswith("usage: ") and "error: " in lines[-1], lines
    assert says in lines[-1], lines[-1]


def test_unexpected_exception_is_one_line_and_v_shows_it(tmp_path):
    """A bug (here: a JSONL writer that raises something no one expected) prints its name on
    one line and points to -v, which shows the traceback; exit 70."""
    code = (
        "import sys, pocketlm.cli.main as cli\n"
        "def boom(args): raise ZeroDivisionError('the unexpected')\n"
        "cli.COMMANDS['doctor'] = boom\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    plain = subprocess.run([sys.executable, "-c", code, "doctor"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 70 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "pocketlm: internal error: ZeroDivisionError: the unexpected (a bug in PocketLM; run with -v to see the "
        "traceback)"
    ]
    for argv in (["-v", "doctor"], ["doctor", "-v"]):
        verbose = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert verbose.returncode == 70 and "Traceback" in verbose.stderr and "ZeroDivisionError" in verbose.stderr


def test_matrix_covers_every_subcommand():
    """Every subcommand that takes a model, a file or a name has rows in the matrix above."""
    from pocketlm.cli.main import COMMANDS

    covered = {args.split()[0] for args, _, _ in CASES}
    assert set(COMMANDS) - {"doctor", "list"} <= covered, set(COMMANDS) - covered
