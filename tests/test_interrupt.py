"""Interrupted and failing conversions leave nothing that looks like a model, and re-runs work."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from reference import make_t5

from pocketlm.converters.synthetic import build_random_bloom


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    # big enough that conversion takes a moment, small enough to keep the test quick
    return build_random_bloom(tmp_path_factory.mktemp("big") / "hf", hidden=512, n_layer=8, n_head=8, vocab_size=2048)


def _convert_cmd(src, out, quant, fmt="gguf"):
    return [sys.executable, "-m", "pocketlm.converters", str(src), "-o", str(out), "--quant", quant, "--format", fmt]


def _wait_for_partial(folder, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.endswith(".partial") for p in folder.iterdir()):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_sigkill_then_rerun_leaves_only_the_finished_model(bloom, tmp_path, quant):
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen(_convert_cmd(bloom, out, quant), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for_partial(tmp_path, proc), "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # a killed run leaves its temporary, never the output
    rerun = subprocess.run(_convert_cmd(bloom, out, quant), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the dead run's temporary is gone too


def test_ctrl_c_exits_130_and_leaves_nothing(bloom, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen(_convert_cmd(bloom, out, "q8_0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_partial(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with an error
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    from pocketlm.cli.main import main
    sys.exit(main({args!r}))
    """
)


@pytest.mark.parametrize("quant,fmt", [("q8_0", "gguf"), ("q4_k_m", "gguf"), ("int8", "ct2")])
def test_full_disk_is_one_clear_line_and_leaves_nothing(bloom, tmp_path, quant, fmt):
    src = bloom
    if fmt == "ct2":
        src = tmp_path / "t5"
        make_t5(src, d_model=256, d_kv=64, n_heads=4, d_ff=512, vocab=2048)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("m.gguf" if fmt == "gguf" else "m")
    args = ["convert", str(src), "-o", str(out), "--quant", quant, "--format", fmt]
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED.format(limit=200_000, args=args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("pocketlm: error:")
    assert list(out_dir.iterdir()) == []
    # with room again, the same command works
    ok = subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert [p.name for p in out_dir.iterdir()] == [out.name]
