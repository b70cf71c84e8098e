"""lm-evaluation-harness on PocketLM (runtime/evaluation.py, `pocketlm eval`) against lm-eval's own
`hf` model on the same checkpoints: the same accuracy, per-request log-likelihoods within a stated
tolerance, the same generated texts.

Local tasks only (tests/fixtures/lm_eval_tasks: 20 multiple-choice questions, 20 generation
prompts, 6 texts for perplexity; read from JSONL, nothing downloaded). The models are tiny random
ones: their answers are arbitrary but deterministic, so equal accuracy over 20 questions is a
real check once each request's log-likelihood matches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from reference import T5_PIECES, make_bloom, make_t5

from pocketlm.cli.main import main
from pocketlm.converters import convert
from pocketlm.converters.core.errors import RequestError
from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
CHOICE, GENERATE, PERPLEXITY = "pocketlm_choice", "pocketlm_generate", "pocketlm_perplexity"
ALL = [CHOICE, GENERATE, PERPLEXITY]
# Per-request |log-likelihood difference| allowed. f32 BLOOM on llama.cpp and f32 T5 on CTranslate2
# match transformers to about 1e-5 here. llama.cpp's T5 graph is within 1e-3 relative of
# transformers' logits (tests/parity.py): each scored token may be off by about 1e-3 (measured:
# 1.4e-3 over 3-6 tokens, 3.9e-3 over 70).
ABSOLUTE = 1e-3
PER_TOKEN = 1e-3


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No dataset or hub request (the tasks are local files)."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """(checkpoint folder, f32 GGUF) of a tiny random BLOOM with a trained byte-level tokenizer."""
    root = tmp_path_factory.mktemp("eval-bloom")
    tokenizer = train_bloom_tokenizer(SAMPLE_TEXT, 400)
    make_bloom(root / "hf", hidden=64, n_head=4, vocab=400, tokenizer=tokenizer)
    # transformers' tokenizer learns BLOOM's special tokens from here (lm-eval stops at its eos)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(special))
    return root / "hf", convert(root / "hf", root / "m.gguf", quant="f32").output


@pytest.fixture(scope="module")
def t5(tmp_path_factory, t5_tokenizer_files):
    """(checkpoint folder, {format: converted path}) of a tiny random T5 (tied, scaled head: the
    one layout transformers loads alike with and without lm-eval's device map)."""
    root = tmp_path_factory.mktemp("eval-t5")
    make_t5(root / "hf", vocab=T5_PIECES + 100 + 20, head="tied-scaled", tokenizer_files=t5_tokenizer_files)
    out = {
        "ct2": convert(root / "hf", root / "ct2", format="ct2", quant="float32").output,
        "gguf": convert(root / "hf", root / "m.gguf", format="gguf", quant="f32").output,
    }
    return root / "hf", out


def evaluate(tasks: Any, model: str, model_args: str, names: list[str], **kwargs: Any) -> dict[str, Any]:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=names,
        task_manager=tasks,
        batch_size=kwargs.pop("batch_size", 1),
        log_samples=True,
        device="cpu" if model == "hf" else None,
        **kwargs,
    )


def pocketlm_evaluate(tasks: Any, path: Path, names: list[str], extra: str = "", **kwargs: Any) -> dict[str, Any]:
    import pocketlm.evaluation  # noqa: F401 (registers "pocketlm")

    return evaluate(tasks, "pocketlm", f"pretrained={path},threads=2{extra}", names, **kwargs)


_memo: dict[tuple[str, ...], dict[str, Any]] = {}


def hf_evaluate(tasks: Any, folder: Path, names: list[str], extra: str = "") -> dict[str, Any]:
    """lm-eval's `hf` model on the checkpoint (computed once per module: it is the slow side)."""
    key = (str(folder), extra, *names)
    if key not in _memo:
        _memo[key] = evaluate(tasks, "hf", f"pretrained={folder}{extra}", names)
    return _memo[key]


def metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}


def answers(results: dict[str, Any], task: str) -> list[Any]:
    """Each request's answer, in order: (log-likelihood, greedy), a log-likelihood, or a text."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [resp[0] for s in samples for resp in s["resps"]]


def requests(results: dict[str, Any], task: str) -> list[tuple[str, ...]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [tuple(args) for s in samples for args in s["arguments"]]


def assert_same(got: dict[str, Any], expected: dict[str, Any], task: str, tolerance: Any = None) -> None:
    """Same metrics; each log-likelihood within tolerance(request) (default ABSOLUTE); same
    greedy flags and generated texts."""
    ours, theirs = answers(got, task), answers(expected, task)
    assert len(ours) == len(theirs) > 0
    worst = 0.0
    for request, a, b in zip(requests(expected, task), ours, theirs):
        if isinstance(b, str):
            assert a == b, f"{task}: {request[0]!r} generated {a!r}, transformers {b!r}"
            continue
        (a, a_greedy), (b, b_greedy) = _with_greedy(a), _with_greedy(b)
        allowed = tolerance(request) if tolerance else ABSOLUTE
        assert abs(a - b) <= allowed, f"{task}: {request!r}: {a} vs transformers' {b} (allowed {allowed:g})"
        assert a_greedy == b_greedy, f"{task}: {request!r}: greedy {a_greedy} vs {b_greedy}"
        worst = max(worst, abs(a - b))
    ours_m, theirs_m = metrics(got, task), metrics(expected, task)
    assert ours_m.keys() == theirs_m.keys()
    for name, value in theirs_m.items():
        if task == PERPLEXITY:  # sums of the log-likelihoods checked above
            assert ours_m[name] == pytest.approx(value, rel=1e-3), name
        else:
            assert ours_m[name] == value, f"{task} {name}: {ours_m[name]} vs transformers' {value}"


def _with_greedy(answer: Any) -> tuple[float, bool | None]:
    return (answer, None) if isinstance(answer, float) else answer


# -- BLOOM (llama.cpp) --------------------------------------------------------------------------


def test_bloom_gguf_matches_hf(bloom, tasks):
    folder, gguf = bloom
    got = pocketlm_evaluate(tasks, gguf, ALL, batch_size=4)  # generation: 4 prompts decoded together
    expected = hf_evaluate(tasks, folder, ALL)
    for task in ALL:
        assert_same(got, expected, task)
    texts = answers(got, GENERATE)
    assert sum(bool(t) for t in texts) >= 10, texts  # the generation check compares texts, not empties


def test_bloom_truncation_and_rolling_windows_match_hf(bloom, tasks):
    """max_length 16: contexts cut from the left, each text scored in several rolling windows."""
    folder, gguf = bloom
    names = [CHOICE, PERPLEXITY, GENERATE]
    extra = ",max_length=16"
    got = pocketlm_evaluate(tasks, gguf, names, extra, gen_kwargs="max_gen_toks=6")
    expected = evaluate(tasks, "hf", f"pretrained={folder}{extra}", names, gen_kwargs="max_gen_toks=6")
    for task in names:
        assert_same(got, expected, task)


# -- T5 family (CTranslate2 and llama.cpp) -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ct2", "gguf"])
def test_t5_matches_hf_seq2seq(t5, tasks, fmt):
    from transformers import AutoTokenizer

    folder, paths = t5
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names = [CHOICE, GENERATE] + ([PERPLEXITY] if fmt == "gguf" else [])
    got = pocketlm_evaluate(tasks, paths[fmt], names)
    expected = hf_evaluate(tasks, folder, [CHOICE, GENERATE, PERPLEXITY], ",backend=seq2seq")

    def tolerance(request: tuple[str, ...]) -> float:
        if fmt == "ct2":
            return ABSOLUTE
        scored = request[-1]  # the continuation, or the whole text (perplexity)
        return PER_TOKEN * len(tokenizer(scored)["input_ids"])

    for task in names:
        assert_same(got, expected, task, tolerance)


def test_t5_ct2_refuses_perplexity_in_one_line(t5, tasks):
    """CTranslate2 returns nothing for a source that is only </s>: the first rolling window's."""
    _, paths = t5
    with pytest.raises(RequestError, match="CTranslate2 cannot score .* need the model as GGUF"):
        pocketlm_evaluate(tasks, paths["ct2"], [PERPLEXITY])


# -- the command --------------------------------------------------------------------------------


def test_cli_eval_json_has_the_tasks_metrics(bloom, tasks, tmp_path, capsys):
    folder, gguf = bloom
    out = tmp_path / "results.json"
    argv = ["eval", str(gguf), "--tasks", f"{CHOICE},{GENERATE}", "--include-path", str(TASKS)]
    code = main([*argv, "--threads", "2", "--batch-size", "2", "--json", "--output-path", str(out)])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    expected = hf_evaluate(tasks, folder, ALL)
    for task in (CHOICE, GENERATE):
        assert {k: shown["results"][task][k] for k in metrics(expected, task)} == metrics(expected, task)
    saved = json.loads(out.read_text())
    assert saved["results"] == shown["results"]
    assert len(saved["samples"][CHOICE]) == 20


def test_cli_eval_errors_are_one_line(bloom, capsys, monkeypatch):
    _, gguf = bloom
    assert main(["eval", str(gguf), "--tasks", "no_such_task", "--include-path", str(TASKS)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown task: no_such_task" in err

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", str(gguf), "--tasks", CHOICE]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'pocketlm[eval]'" in err


def test_pocketlm_imports_without_lm_eval():
    code = "import sys, pocketlm, pocketlm.cli.main; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- lm-eval's local-completions against `pocketlm serve` ---------------------------------------


def test_lm_eval_local_completions_against_the_server_matches_hf(bloom, tasks, tmp_path):
    """`lm_eval --model local-completions` (token-id prompts, two per request) on the local tasks
    against the server on the BLOOM GGUF: lm-eval's `hf` model's scores on the checkpoint."""
    from test_server import running

    import pocketlm

    folder, gguf = bloom
    args = f"model=tiny,tokenizer={folder},tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1"
    with pocketlm.load(gguf, n_ctx=256, threads=2, parallel=2) as model, running(model, model_name="tiny") as server:
        command = [sys.executable, "-m", "lm_eval", "--model", "local-completions"]
        command += ["--model_args", f"{args},base_url={server.url}/v1/completions", "--batch_size", "2"]
        command += ["--tasks", ",".join(ALL), "--include_path", str(TASKS)]
        command += ["--output_path", str(tmp_path), "--log_samples"]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    got: dict[str, Any] = {"results": json.loads(results_file.read_text())["results"], "samples": {}}
    for task in ALL:
        (samples,) = tmp_path.rglob(f"samples_{task}_*.jsonl")
        got["samples"][task] = [_logged(json.loads(line), task) for line in samples.read_text().splitlines()]
    expected = hf_evaluate(tasks, folder, ALL)
    for task in ALL:
        assert_same(got, expected, task)


def _logged(sample: dict[str, Any], task: str) -> dict[str, Any]:
    """A logged sample as simple_evaluate returns it: lm-eval's JSON writes each answer's
    numbers and flags as strings, and the arguments as a dict."""

    def value(text: str) -> Any:
        return text if task == GENERATE else (text == "True" if text in ("True", "False") else float(text))

    resps = [[tuple(map(value, r)) if isinstance(r, list) else value(r) for r in resp] for resp in sample["resps"]]
    return {**sample, "resps": resps, "arguments": [tuple(a.values()) for a in sample["arguments"].values()]}
