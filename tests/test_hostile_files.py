"""Files whose numbers are hostile: one line naming the file, the key and the value; exit 1;
bounded time and memory (issue 25).

llama.cpp trusts a GGUF's metadata: a context_length of 4e9 (a negative int32 to llama.cpp)
made it allocate without bound while `info` said "about 8 MiB", a NaN epsilon aborted the first
completion (GGML_ASSERT), a block_count of 600 aborted the load (exit 134). The converters
built per-layer plans for a config's billion layers (seconds, gigabytes), indexed the
vocabulary with a start token id of 1e9 (IndexError), and took any `gated-*` feed-forward.
Each case patches one value of a small valid file. Command-line cases run in a subprocess
whose address space is capped (RLIMIT_AS), so a regression fails instead of eating the machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import make_t5

import pocketlm
from pocketlm.backends import llama_common
from pocketlm.cli.report import model_report
from pocketlm.converters import convert
from pocketlm.converters.architectures.t5 import _feed_forward
from pocketlm.converters.core.checks import check_gguf
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.converters.core.gguf_file import read_header
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.loading.machine import available_ram_bytes, ram_bytes
from pocketlm.loading.source import inspect

ADDRESS_SPACE = 3 << 30  # what a command may map: the bugs took 1.5 GB within a second, and grew
MIB = 2**20
_TYPES = {4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}  # GGUF scalar value types


def patch_gguf(src: Path, dst: Path, key: str, value: float) -> Path:
    """A copy of `src` with metadata `key` (a scalar) set to `value`, in place, same type."""
    data = bytearray(src.read_bytes())
    name = key.encode()
    start = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    struct.pack_into(_TYPES[struct.unpack_from("<I", data, start)[0]], data, start + 4, value)
    dst.write_bytes(bytes(data))
    return dst


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A checkpoint folder sharing `src`'s files, with config.json values changed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(*argv: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a subprocess of bounded address space; its result and wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "POCKETLM_"))}
    env["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pocketlm", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=_capped,
    )
    return proc, time.perf_counter() - started


def assert_one_line_error(proc: subprocess.CompletedProcess, *says: str) -> None:
    assert "Traceback" not in proc.stderr and "GGML_ASSERT" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), lines
    for word in says:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small valid models: BLOOM and T5 checkpoints and their f16 GGUFs. The T5's heads are
    wider than d_model / n_heads (as mT5's), which llama.cpp sizes its KV cache by."""
    root = tmp_path_factory.mktemp("hostile")
    bloom_hf = build_random_bloom(root / "bloom-hf", hidden=64, n_layer=2, n_head=4, vocab_size=512)
    make_t5(root / "t5-hf", d_model=64, n_heads=4, d_kv=32, n_layers=2, vocab=160)
    return {
        "bloom-hf": bloom_hf,
        "t5-hf": root / "t5-hf",
        "bloom": Path(convert(bloom_hf, root / "bloom.gguf", quant="f16").output),
        "t5": Path(convert(root / "t5-hf", root / "t5.gguf", format="gguf", quant="f16").output),
    }


# -- GGUF metadata, checked against the tensors before llama.cpp sees the file ---------------------

GGUF_CASES = [
    # (model, key, value, what the message says besides file, key and value)
    ("bloom", "bloom.context_length", 4_000_000_000, "not a count from 1 to 2147483647"),
    ("bloom", "bloom.context_length", 0, "not a count"),
    ("bloom", "bloom.attention.layer_norm_epsilon", math.nan, "not a positive finite number"),
    ("bloom", "bloom.attention.layer_norm_epsilon", math.inf, "not a positive finite number"),
    ("bloom", "bloom.attention.layer_norm_epsilon", 0.0, "not a positive finite number"),
    ("bloom", "bloom.attention.layer_norm_epsilon", -0.5, "not a positive finite number"),
    ("bloom", "bloom.block_count", 600, "the file holds 2 blocks (blk.0 to blk.1)"),
    ("bloom", "bloom.block_count", 3, "the file holds 2 blocks"),
    ("bloom", "bloom.block_count", 1, "the file holds 2 blocks"),
    ("bloom", "bloom.attention.head_count", 3, "does not divide bloom.embedding_length=64"),
    ("bloom", "bloom.attention.head_count", 0, "not a count"),
    ("bloom", "bloom.attention.head_count_kv", 3, "does not divide bloom.attention.head_count=4"),
    ("bloom", "bloom.embedding_length", 32, "tensor token_embd.weight has rows of 64"),
    ("bloom", "bloom.feed_forward_length", 2**31, "not a count"),
    ("bloom", "tokenizer.ggml.eos_token_id", 10**9, "not a token id (the vocabulary has 512 tokens)"),
    ("t5", "t5.context_length", 4_000_000_000, "not a count"),
    ("t5", "t5.attention.layer_norm_rms_epsilon", math.nan, "not a positive finite number"),
    ("t5", "t5.block_count", 600, "the file holds 2 blocks (enc.blk.0 to enc.blk.1)"),
    ("t5", "t5.decoder_start_token_id", 10**9, "not a token id (the vocabulary has 160 tokens)"),
    ("t5", "t5.attention.key_length", 16, "differs from t5.attention.value_length=32"),
    ("t5", "t5.attention.relative_buckets_count", 0, "not a count"),
]


def _shown(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("model, key, value, says", GGUF_CASES, ids=[f"{k}={_shown(v)}" for _, k, v, _ in GGUF_CASES])
def test_hostile_gguf_metadata_is_refused_before_llama_cpp(models, tmp_path, model, key, value, says):
    path = patch_gguf(models[model], tmp_path / "hostile.gguf", key, value)
    with pytest.raises(ModelLoadError) as caught:
        inspect(path)  # what load(), info and the hub run first; no engine is involved
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert f"{key}={_shown(value)}" in message and says in message, message


@settings(
    max_examples=int(os.environ.get("POCKETLM_FUZZ_EXAMPLES", 150)),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_metadata_value_is_checked_or_refused(models, tmp_path, data):
    """Any numeric metadata value of either model: refused in one line, or sizes llama.cpp holds."""
    model = data.draw(st.sampled_from(["bloom", "t5"]))
    header = read_header(models[model])
    keys = sorted(k for k, v in header.metadata.items() if type(v) in (int, float))
    key = data.draw(st.sampled_from(keys))
    if isinstance(header.metadata[key], float):
        value = data.draw(st.floats(width=32))
    else:
        value = data.draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 512, 513, 2**31])))
    path = patch_gguf(models[model], tmp_path / "fuzzed.gguf", key, value)
    try:
        dims = check_gguf(read_header(path), path)
    except ModelLoadError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        return
    assert all(1 <= getattr(dims, f) <= 2**31 - 1 for f in dims.__dataclass_fields__)
    assert dims.n_layer <= 512 and dims.head_k == dims.head_v and dims.n_head % dims.n_head_kv == 0


RISKY = [  # what the user saw: unbounded memory, aborts (exit 134) with 74 or 0 lines, an 8 MiB KV cache in info
    ("bloom", "bloom.context_length", 4_000_000_000),
    ("bloom", "bloom.attention.layer_norm_epsilon", math.nan),
    ("bloom", "bloom.block_count", 600),
    ("t5", "t5.attention.layer_norm_rms_epsilon", math.nan),
    ("t5", "t5.decoder_start_token_id", 10**9),
]


@pytest.mark.parametrize("command", ["info", "run", "quantize"])
@pytest.mark.parametrize("model, key, value", RISKY, ids=[f"{k}={_shown(v)}" for _, k, v in RISKY])
def test_cli_refuses_hostile_gguf_in_one_line_with_bounded_memory(models, tmp_path, command, model, key, value):
    path = patch_gguf(models[model], tmp_path / "hostile.gguf", key, value)
    argv = {
        "info": ["info", str(path)],
        "run": ["run", str(path), "--ids", "5,6,7", "--max-new-tokens", "2"],
        "quantize": ["quantize", str(path), str(tmp_path / "q.gguf"), "--quant", "q8_0"],
    }[command]
    proc, _ = run_cli(*argv)
    assert_one_line_error(proc, str(path), f"{key}={_shown(value)}")
    assert not (tmp_path / "q.gguf").exists()


def test_models_opened_directly_check_their_file_too(models, tmp_path):
    """LlamaCausalEngine / LlamaSeq2SeqEngine built without load() (tests, benchmarks) check the
    header before llama.cpp loads the file (in a subprocess: a regression aborts it)."""
    bloom = patch_gguf(models["bloom"], tmp_path / "b.gguf", "bloom.block_count", 600)
    t5 = patch_gguf(models["t5"], tmp_path / "t.gguf", "t5.attention.layer_norm_rms_epsilon", math.nan)
    code = (
        "import sys\n"
        "from pocketlm.converters.core.errors import ModelLoadError\n"
        "from pocketlm.backends.llama_causal import LlamaCausalEngine\n"
        "from pocketlm.backends.llama_seq2seq import LlamaSeq2SeqEngine\n"
        "for cls, path in ((LlamaCausalEngine, sys.argv[1]), (LlamaSeq2SeqEngine, sys.argv[2])):\n"
        "    try:\n"
        "        cls(path)\n"
        "    except ModelLoadError as e:\n"
        "        print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bloom), str(t5)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_capped,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        f"{bloom}: bloom.block_count=600, but the file holds 2 blocks (blk.0 to blk.1)",
        f"{t5}: t5.attention.layer_norm_rms_epsilon=nan is not a positive finite number (a normalisation epsilon)",
    ]


# -- the KV cache: computed before the context is created, the same number everywhere ---------------


def _llama_kv_log(records: list[logging.LogRecord]) -> tuple[float, int]:
    """(MiB, cells) of llama.cpp's own `llama_kv_cache: size = ...` log line."""
    for r in records:
        m = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", r.getMessage())
        if m:
            return float(m.group(1)), int(m.group(2))
    raise AssertionError("llama.cpp logged no KV cache size")


@pytest.mark.parametrize("model", ["bloom", "t5"])
def test_kv_bytes_are_what_llama_cpp_allocates_and_what_info_shows(models, caplog, model):
    """The one formula (pocketlm.converters.core.checks.kv_cell_bytes) against llama.cpp's own figure, on a
    T5 whose heads are wider than d_model / n_heads (the old formula said half)."""
    run = model_report(str(models[model]), threads=2)["would_run_on"]
    with caplog.at_level(logging.DEBUG, logger="pocketlm.llama_cpp"):
        with pocketlm.load(models[model], threads=2, parallel="auto") as served:
            info = served.info
    assert (info.kv_cells, info.kv_bytes) == (run["serving_kv_cells"], run["serving_kv_bytes"])
    assert _llama_kv_log(caplog.records) == (round(info.kv_bytes / MIB, 2), info.kv_cells)


def test_default_context_is_cut_to_the_ram_and_info_shows_the_cut(models, monkeypatch, caplog):
    """With little RAM available the default KV cache shrinks to fit, with one warning line,
    and `pocketlm info` shows the number used; a size asked for that does not fit is refused."""
    path = models["bloom"]
    cell = 2 * 4 * (16 + 16) * 2  # blocks x KV heads x (key + value width) x f16
    budget_cells = 1024
    available = path.stat().st_size + 2 * budget_cells * cell  # KV_AVAILABLE_SHARE is 1/2
    monkeypatch.setattr(llama_common, "available_ram_bytes", lambda: available)
    run = model_report(str(path), threads=2)["would_run_on"]
    assert (run["serving_kv_cells"], run["serving_kv_bytes"]) == (budget_cells, budget_cells * cell)
    with caplog.at_level(logging.WARNING, logger="pocketlm.backends.llama_common"):
        with pocketlm.load(path, threads=2, parallel="auto") as model:
            assert (model.info.kv_cells, model.info.kv_bytes) == (budget_cells, budget_cells * cell)
            assert model.info.n_ctx == budget_cells  # from the trained 2048
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not fit" in warnings[0] and "holds 1024 tokens instead" in warnings[0]
    with pytest.raises(ModelLoadError, match=r"does not fit: this machine can spare 0.5 MiB \(at most 1024 tokens"):
        pocketlm.load(path, threads=2, n_ctx=4096)
    monkeypatch.setattr(llama_common, "available_ram_bytes", lambda: path.stat().st_size + 100 * cell)
    with pytest.raises(ModelLoadError, match="this machine can spare 0.0 MiB, not even 256 tokens"):
        pocketlm.load(path, threads=2)


def test_context_is_int32_and_never_past_the_trained_length_unless_asked(models, tmp_path):
    path = patch_gguf(models["bloom"], tmp_path / "short.gguf", "bloom.context_length", 100)
    with pocketlm.load(path, threads=2) as model:
        assert model.info.n_ctx == 100 and model.info.kv_cells == 256  # llama.cpp's cells come in 256s
    with pocketlm.load(path, threads=2, n_ctx=300) as model:
        assert model.info.n_ctx == 512  # asked for: past the trained 100, rounded up as llama.cpp does
    for n_ctx in (2**31, 4_000_000_000):  # in a subprocess: a regression would allocate for them
        proc, _ = run_cli("run", str(path), "--ids", "5,6", "--ctx", str(n_ctx))
        assert_one_line_error(proc, f"n_ctx={n_ctx}: a context holds 1 to 2147483647 tokens")


def test_available_ram_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    1000 kB\n")
    assert available_ram_bytes(str(meminfo)) == 1024000
    assert available_ram_bytes(str(tmp_path / "none")) == ram_bytes()


# -- configs: checked against the checkpoint before any per-layer work -------------------------------

CONFIG_CASES = [
    # (checkpoint, convert options, config changes, what the message says)
    ("bloom-hf", [], {"n_layer": 10**9}, "n_layer=1000000000, but the checkpoint has 2 blocks (h.0 to h.1)"),
    ("bloom-hf", [], {"eos_token_id": 10**9}, "eos_token_id=1000000000 is not a token id"),
    ("bloom-hf", [], {"pad_token_id": -1}, "pad_token_id=-1 is not a token id"),
    ("bloom-hf", [], {"layer_norm_epsilon": 0}, "layer_norm_epsilon=0 is not a positive finite number"),
    ("bloom-hf", [], {"seq_length": 4_000_000_000}, "seq_length=4000000000 is not a count"),
    ("t5-hf", [], {"num_layers": 10**9}, "num_layers=1000000000, but the checkpoint has 2 blocks"),
    ("t5-hf", ["--format", "gguf"], {"num_layers": 10**9}, "num_layers=1000000000"),
    ("t5-hf", [], {"num_decoder_layers": 10**9}, "num_decoder_layers=1000000000"),
    ("t5-hf", [], {"decoder_start_token_id": 10**9}, "decoder_start_token_id=1000000000 is not a token id"),
    ("t5-hf", ["--format", "gguf"], {"decoder_start_token_id": 160}, "decoder_start_token_id=160 is not a token"),
    ("t5-hf", [], {"eos_token_id": 10**9}, "eos_token_id=1000000000 is not a token id"),
    ("t5-hf", [], {"pad_token_id": 10**9}, "pad_token_id=1000000000 is not a token id"),
    ("t5-hf", [], {"feed_forward_proj": "gated-evil"}, "feed_forward_proj='gated-evil' is not supported"),
    ("t5-hf", ["--format", "gguf"], {"feed_forward_proj": "gated-evil"}, "feed_forward_proj='gated-evil'"),
    ("t5-hf", [], {"feed_forward_proj": "evil-gelu"}, "feed_forward_proj='evil-gelu' is not supported"),
    ("t5-hf", [], {"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj='gated-gelu-x' is not supported"),
    ("t5-hf", [], {"dense_act_fn": "evil"}, "dense_act_fn='evil' is not supported"),
    ("t5-hf", [], {"layer_norm_epsilon": -1e-6}, "layer_norm_epsilon=-1e-06 is not a positive finite number"),
    ("t5-hf", ["--format", "gguf"], {"n_positions": 2**31}, "n_positions=2147483648 is not a count"),
]


@pytest.mark.parametrize(
    "model, options, changes, says",
    CONFIG_CASES,
    ids=[f"{m.split('-')[0]}{'-gguf' if o else ''}-{next(iter(c))}" for m, o, c, _ in CONFIG_CASES],
)
def test_hostile_config_is_one_line_in_bounded_time_and_memory(models, tmp_path, model, options, changes, says):
    folder = with_config(models[model], tmp_path / "hf", **changes)
    out = tmp_path / "out"
    proc, seconds = run_cli("convert", str(folder), "-o", str(out), *options)
    assert_one_line_error(proc, f"{folder / 'config.json'}: ", says)
    assert seconds < 8, seconds  # n_layer 1e9 took 17-19 s and 3 GB before
    assert not out.exists()


T5_FEED_FORWARDS = [
    {"feed_forward_proj": "relu"},
    {"feed_forward_proj": "gated-gelu"},
    {"feed_forward_proj": "gelu"},
    {"feed_forward_proj": "gated-silu"},
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_pytorch_tanh"},
]


@pytest.mark.parametrize("config", T5_FEED_FORWARDS, ids=lambda c: "+".join(map(str, c.values())))
def test_feed_forwards_transformers_accepts_are_read_as_it_reads_them(config):
    from transformers import T5Config

    reference = T5Config.from_dict(config)
    assert _feed_forward(config, "config.json") == (reference.dense_act_fn, reference.is_gated_act)
