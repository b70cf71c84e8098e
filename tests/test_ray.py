"""PocketLM on Ray (runtime/serving/ray_cluster.py), on a local Ray instance limited to 2 CPUs.

A Ray Data job over a few hundred prompts on two actors gives what one process gives; a
checkpoint folder is converted once on the node, the other actor waiting on the cache lock;
`pocketlm run --ray` is resumable; a killed actor's batch is retried and written once; a
Ray Serve deployment with two replicas answers the OpenAI client as `pocketlm serve` does.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import ray
import ray.cloudpickle
import ray.data
from ray import serve

import pocketlm
from pocketlm.cli.batch import answer, run_jsonl
from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.serving.ray_cluster import Predictor, deployment, run_jsonl_on_ray

# The predictor subclasses below live in this test module, which Ray's workers cannot import.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEW = 6
ROOT = Path(__file__).resolve().parent.parent


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(4, 500, size=rng.integers(1, 12))] for _ in range(n)]


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    folder = build_random_bloom(root / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    return folder, convert(folder, root / "m-f32.gguf", quant="f32").output


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance of 2 CPUs; its workers inherit this process's environment, so
    POCKETLM_CACHE points them (and this process) at a fresh cache."""
    cache = tmp_path_factory.mktemp("ray-cache")
    old = os.environ.get("POCKETLM_CACHE")
    os.environ["POCKETLM_CACHE"] = str(cache)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cache
    serve.shutdown()
    ray.shutdown()
    if old is None:
        os.environ.pop("POCKETLM_CACHE")
    else:
        os.environ["POCKETLM_CACHE"] = old


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _records(path: Path) -> dict:
    out: dict = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        assert json.dumps(r["id"]) not in out, f"{r['id']} written twice"
        out[json.dumps(r["id"])] = r
    return out


def _same_answers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for field in ("prompt", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"):
            assert a[key][field] == b[key][field], (key, field)


def test_cli_run_on_a_local_ray_instance_is_resumable(bloom, tmp_path):
    # first in this file: `--ray` without an address starts (and stops) its own local instance
    _, gguf = bloom
    prompts = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(_prompts(40, seed=1))]
    lines += [json.dumps(f"Question {i}: what is {i} + {i}?") for i in range(10)]  # text prompts, keyed by line
    prompts.write_text("\n".join(lines) + "\n")
    alone = tmp_path / "alone.jsonl"
    assert _run(gguf, "--input", prompts, "--output", alone, "--max-new-tokens", NEW).returncode == 0
    out = tmp_path / "out.jsonl"
    first = _run(gguf, "--input", prompts, "--output", out, "--max-new-tokens", NEW, "--ray", "--actors", 2)
    assert first.returncode == 0, first.stderr
    assert "answered 50 prompts (0 already answered)" in first.stdout
    _same_answers(_records(out), _records(alone))
    # killed mid-write: a torn line, answers missing; the re-run keeps what is there and completes
    kept = out.read_text().splitlines()[:20]
    out.write_text("\n".join(kept) + '\n{"id": "p3", "te')
    second = _run(gguf, "--input", prompts, "--output", out, "--max-new-tokens", NEW, "--ray", "--actors", 2)
    assert "answered 30 prompts (20 already answered)" in second.stdout, second.stdout + second.stderr
    assert out.read_text().splitlines()[:20] == kept
    _same_answers(_records(out), _records(alone))


class RecordingPredictor(Predictor):
    """Says which actor answered each row; with `loads` set, each actor also leaves a file there
    naming the model file it loaded (path, inode, mtime)."""

    loads = ""

    def __init__(self, model: str, **kw):
        super().__init__(model, **kw)
        if self.loads:
            st = os.stat(self.model.info.path)
            Path(self.loads, str(os.getpid())).write_text(f"{self.model.info.path}:{st.st_ino}:{st.st_mtime_ns}")

    def __call__(self, batch):
        out = super().__call__(batch)
        out["actor"] = [os.getpid()] * len(batch["prompt"])
        return out


def _data_job(model, prompts, predictor=Predictor, **kw):
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)], override_num_blocks=20)
    ds = ds.map_batches(
        predictor,
        fn_constructor_kwargs={"model": str(model), "options": {"max_new_tokens": NEW}, "batch_size": 16, **kw},
        batch_size=16,
        concurrency=2,
        num_cpus=1,
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(prompts)))
    return rows


def test_data_job_on_two_actors_matches_one_process(bloom, cluster):
    # f32, where batching is exact: quantized matrix products in llama.cpp take other kernels
    # for other batch sizes, so a near tie may go either way with a different batch mix
    _, gguf = bloom
    prompts = _prompts(300)
    rows = _data_job(gguf, prompts, RecordingPredictor)
    assert len({r["actor"] for r in rows}) == 2  # both actors answered
    with pocketlm.load(gguf, threads=2, parallel=16) as model:
        alone = [answer(r) for r in model.generate_batch(prompts, max_new_tokens=NEW)]
    for row, expected in zip(rows, alone):
        assert list(row["prompt"]) == prompts[row["id"]]
        assert {k: _value(row[k]) for k in expected} == expected, row["id"]


def test_a_checkpoint_folder_is_converted_once_per_node(bloom, cluster, tmp_path):
    folder, _ = bloom
    RecordingPredictor.loads = str(tmp_path)
    try:
        _data_job(folder, _prompts(40), RecordingPredictor)
    finally:
        RecordingPredictor.loads = ""
    # both actors loaded the same file, written once: the one in the cache
    loads = {f.read_text() for f in tmp_path.iterdir()}
    assert len(list(tmp_path.iterdir())) == 2 and len(loads) == 1
    entries = [e for e in (cluster / "converted").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1
    with pocketlm.load(folder, threads=2) as model:
        st = os.stat(model.info.path)
        assert loads == {f"{model.info.path}:{st.st_ino}:{st.st_mtime_ns}"}
        assert Path(model.info.path).parent == entries[0]


def _value(v):
    return [int(t) for t in v] if isinstance(v, np.ndarray) else v


def test_data_job_scores_candidates(bloom, cluster):
    _, gguf = bloom
    rows = [{"prompt": [5, 6, 7], "candidates": [[8], [9, 10], [11]]}, {"prompt": [12], "candidates": [[13], [14]]}]
    ds = ray.data.from_items(rows).map_batches(
        Predictor, fn_constructor_kwargs={"model": str(gguf)}, batch_size=2, concurrency=1, num_cpus=1
    )
    got = ds.take_all()
    with pocketlm.load(gguf, threads=2) as model:
        for row, item in zip(got, rows):
            expected = model.score(item["prompt"], item["candidates"])
            assert np.allclose(row["scores"], expected, rtol=1e-5)
            assert row["choice"] == int(np.argmax(expected))


class KilledOnce(Predictor):
    """Dies (SIGKILL, as an OOM killer would) in the middle of the batch holding row 100,
    the first time only: a marker file remembers."""

    marker = ""

    def __call__(self, batch):
        if 100 in list(batch["row"]) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            self.model.generate_batch([[5, 6]], max_new_tokens=2)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_killed_actors_batch_is_retried_and_written_once(bloom, cluster, tmp_path):
    _, gguf = bloom
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(_prompts(200, 2))))
    alone = tmp_path / "alone.jsonl"
    with pocketlm.load(gguf, threads=2, parallel=16) as model:
        run_jsonl(model, prompts, alone, 16, options=model.options(max_new_tokens=NEW))
    KilledOnce.marker = str(tmp_path / "killed")
    out = tmp_path / "out.jsonl"
    stats = run_jsonl_on_ray(
        str(gguf), prompts, out, actors=2, batch_size=16, options={"max_new_tokens": NEW}, predictor=KilledOnce
    )
    assert Path(KilledOnce.marker).exists()  # an actor did die mid-batch
    assert stats.answered == 200
    got = _records(out)  # each id once
    _same_answers(got, _records(alone))


def test_cli_joins_a_running_cluster_by_address(bloom, cluster, tmp_path):
    _, gguf = bloom
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ["One.", "Two.", "Three."]))
    out = tmp_path / "out.jsonl"
    address = ray.get_runtime_context().gcs_address
    proc = _run(gguf, "--input", prompts, "--output", out, "--max-new-tokens", NEW, "--ray", address)
    assert proc.returncode == 0, proc.stderr
    with pocketlm.load(gguf, threads=2) as model:
        for i, r in enumerate(json.loads(line) for line in out.read_text().splitlines()):
            assert r["id"] == i + 1 and r["text"] == model.generate(r["prompt"], max_new_tokens=NEW).text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_deployment_with_two_replicas_answers_the_openai_client(bloom, cluster):
    _, gguf = bloom
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = deployment(str(gguf), replicas=2, num_cpus=0.5, load={"threads": 1}, server={"max_tokens_limit": 64})
    serve.run(app, name="pocketlm", route_prefix="/")
    assert serve.status().applications["pocketlm"].deployments["pocketlm"].replica_states == {"RUNNING": 2}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

    def complete(prompt):
        return client.completions.create(model="m", prompt=prompt, max_tokens=NEW, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(complete, prompts))
    with pocketlm.load(gguf, threads=2) as model:
        for prompt, reply in zip(prompts, replies):
            expected = model.generate(prompt, max_new_tokens=NEW)
            assert reply.choices[0].text == expected.text
            assert reply.usage.completion_tokens == len(expected.token_ids)
        chat = [{"role": "user", "content": "Say hello."}]
        whole = client.chat.completions.create(model="m", messages=chat, max_tokens=NEW, temperature=0)
        pieces = client.chat.completions.create(model="m", messages=chat, max_tokens=NEW, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert streamed == whole.choices[0].message.content != ""
    # the app's own errors come through unchanged
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt="Hi.", max_tokens=10_000)
    serve.delete("pocketlm")
