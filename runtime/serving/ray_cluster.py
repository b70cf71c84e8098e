"""PocketLM as the per-worker engine of Ray Data jobs and Ray Serve deployments (`pocketlm[ray]`).

Batch inference, one model per actor, each actor batching its prompts through the scheduler:

    import ray
    from pocketlm.serving.ray_cluster import Predictor
    ds = ray.data.read_json("prompts.jsonl")           # a "prompt" column: text or token ids
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model": "bigscience/mt0-small",
                        "options": {"max_new_tokens": 32}}, concurrency=4, batch_size=16)
    ds.write_json("answers")

Serving, the OpenAI-compatible app on N replicas behind Ray Serve's HTTP proxy:

    from ray import serve
    from pocketlm.serving.ray_cluster import deployment
    serve.run(deployment("bloomz-560m-q4_k_m.gguf", replicas=2))   # or, from a shell:
    # serve run pocketlm.serving.ray_cluster:app model=bloomz-560m-q4_k_m.gguf replicas=2

`pocketlm run MODEL --input in.jsonl --output out.jsonl --ray [ADDRESS]` is `run_jsonl_on_ray` below.
Models are resolved on each worker as `pocketlm.load` resolves them: a path must exist on every
node (a shared filesystem) or be a hub id; a checkpoint folder is converted once per node into
PocketLM's cache, whose lock makes the other actors on that node wait for it and reuse it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.cli.batch import BatchStats, answer, todo_prompts, write_records
from pocketlm.converters.core.errors import PocketLMError, first_line
from pocketlm.core.model import Prompt

try:
    import ray
except ImportError:  # pragma: no cover (the message is the point)
    raise PocketLMError("Ray is not installed: pip install 'pocketlm[ray]'") from None

__all__ = ["Predictor", "OpenAIReplica", "deployment", "app", "run_jsonl_on_ray", "connect"]


def _reserved_cpus() -> int | None:
    """The CPUs Ray reserved for this actor: the threads its engine should use."""
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


def _prompt(value: Any) -> Prompt:
    """A row's prompt: text, or token ids (a list, or the numpy array Ray Data makes of one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [int(t) for t in value]
    raise PocketLMError(f"a prompt must be text or a list of token ids, got {type(value).__name__}")


class Predictor:
    """A callable class for `Dataset.map_batches`: loads the model once per actor, then answers
    each batch's "prompt" column together (the batching scheduler, `batch_size` sequences).

    Output rows keep the input's columns (the prompt too, unless `keep_prompt` is False) and
    add "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens" (and "score"
    with beams, "texts" with several return sequences). Rows with a "candidates" column (a list
    of answers) are scored instead: "scores" holds each candidate's log-likelihood, "choice" the
    index of the best. A column mixing text and token ids cannot be one Ray block: keep them
    in separate datasets.
    `options` are generation options (`GenerationOptions` fields); the rest goes to
    `pocketlm.load` (device, threads, n_ctx, backend, quant, compute_type)."""

    def __init__(
        self,
        model: str,
        options: dict[str, Any] | None = None,
        batch_size: int = 16,
        keep_prompt: bool = True,
        **load: Any,
    ):
        import pocketlm

        self.keep_prompt = keep_prompt
        load.setdefault("parallel", batch_size if batch_size > 1 else None)
        load.setdefault("threads", _reserved_cpus())
        self.model = pocketlm.load(model, progress=False, **load)
        self.options = self.model.options(**(options or {}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        prompts = [_prompt(p) for p in batch["prompt"]]
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "prompt" or self.keep_prompt}
        if "candidates" in batch:
            pairs = zip(prompts, batch["candidates"])
            scores = [self.model.score(p, [_prompt(c) for c in cands]) for p, cands in pairs]
            out["scores"] = scores
            out["choice"] = [int(np.argmax(s)) for s in scores]
            return out
        for row in map(answer, self.model.generate_batch(prompts, self.options)):
            for name, value in row.items():
                out.setdefault(name, []).append(value)
        return out

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


# Ray Serve: each replica's ingress is the ASGI app `pocketlm serve` runs (runtime/serving/app.py's
# Service), so the API (streaming, errors, 429 when its queue is full, API key, /metrics) is the
# one `pocketlm serve` has; Ray's proxy holds the connections.
class OpenAIReplica:
    """One Ray Serve replica: a model and the OpenAI app in front of it."""

    def __init__(self, model: str, load: dict[str, Any] | None = None, server: dict[str, Any] | None = None):
        import pocketlm
        from pocketlm.serving.app import make_app

        load = dict(load or {})
        load.setdefault("parallel", "auto")
        load.setdefault("threads", _reserved_cpus())
        self.model = pocketlm.load(model, progress=False, **load)
        self.service = make_app(self.model, **(server or {}))

    def __serve_build_asgi_app__(self) -> Any:  # Serve's ingress calls this once, after __init__
        return self.service

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def deployment(
    model: str,
    replicas: int = 1,
    num_cpus: float = 1,
    load: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    name: str = "pocketlm",
) -> Any:
    """A Ray Serve application: `model` on `replicas` replicas, each reserving `num_cpus`.

    `load` goes to `pocketlm.load` on each replica (threads, n_ctx, parallel, ...), `server` to
    `pocketlm.serving.app.make_app` (api_key, max_queue, max_tokens_limit, limits, model_name,
    cors_origins). Serve lets each replica take as many requests at once as its app runs and
    queues; beyond that the app answers 429 itself."""
    from ray import serve

    if replicas < 1:
        raise PocketLMError(f"replicas={replicas}: needs at least 1")
    server = dict(server or {})
    # Serve may hand a replica more than its server runs at once: the server queues or refuses.
    parallel = (load or {}).get("parallel")
    max_ongoing = (parallel if isinstance(parallel, int) else 64) + server.get("max_queue", 64)
    options = {"ray_actor_options": {"num_cpus": num_cpus}, "max_ongoing_requests": max_ongoing}
    replica = serve.ingress()(OpenAIReplica)
    return serve.deployment(replica, name=name, num_replicas=replicas, **options).bind(model, load, server)


def app(args: dict[str, str]) -> Any:
    """The builder `serve run pocketlm.serving.ray_cluster:app model=PATH [replicas=N] [num_cpus=C] [threads=T]
    [parallel=P] [api_key=KEY]` calls."""
    args = dict(args)
    if "model" not in args:
        raise PocketLMError("serve run pocketlm.serving.ray_cluster:app needs model=PATH_OR_HUB_ID")
    load = {k: int(args.pop(k)) for k in ("threads", "n_ctx") if k in args}
    if "parallel" in args:
        value = args.pop("parallel")
        load["parallel"] = value if value == "auto" else int(value)
    server = {"api_key": args.pop("api_key")} if "api_key" in args else {}
    replicas, num_cpus = int(args.pop("replicas", 1)), float(args.pop("num_cpus", 1))
    model = args.pop("model")
    if args:
        raise PocketLMError(f"serve run pocketlm.serving.ray_cluster:app: unknown arguments {', '.join(sorted(args))}")
    return deployment(model, replicas, num_cpus, load, server)


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to), or start a
    local instance limited to this machine's CPUs when None; no-op when already connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core's retry chatter on stderr
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
        return
    _check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as e:
        raise PocketLMError(f"Ray cluster at {address}: cannot connect ({first_line(e)})") from None


def _check_reachable(address: str, timeout: float = 10) -> None:
    """Ray retries an unreachable address for minutes: try its host:port once first."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise PocketLMError(f"Ray cluster at {address}: cannot connect ({e.strerror or e})") from None


def _check_model(model: str) -> None:
    """Fail here, in one line, for a model this machine can see is wrong (workers would each
    fail the same way, deep in Ray's logs); paths only the workers have go to them unchecked."""
    from pocketlm.loading.hub import parse_ref
    from pocketlm.loading.source import inspect

    if Path(model).expanduser().exists():
        inspect(Path(model).expanduser())
    elif Path(model).is_absolute() or parse_ref(model) is None:
        raise PocketLMError(f"{model}: no such file or folder here, and not a hub id (org/name)")


def _pocketlm_error(e: Exception) -> PocketLMError | None:
    """The PocketLMError a worker raised, out of the Ray error reporting it."""
    seen: Exception | None = e
    while seen is not None:
        if isinstance(seen, PocketLMError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    found = re.findall(r"(?m)^pocketlm\.converters\.core\.errors\.\w+: (.+)$", str(e))
    return PocketLMError(f"on a Ray worker: {found[-1]}") if found else None


def run_jsonl_on_ray(
    model: str,
    input_path: Path,
    output_path: Path,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 16,
    options: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
    progress: bool = False,
    predictor: type[Predictor] = Predictor,
) -> BatchStats:
    """`pocketlm run --ray`: the resumable JSONL job of runtime/cli/batch.py on `actors` Ray actors
    (default: one per node), each reserving and using load["threads"] CPUs (default: one node's
    CPUs, or the actors' share of the cluster's when fewer). Answers are appended as batches
    finish, in the order they finish; a batch whose actor dies runs again on a restarted actor
    and is written once. `predictor` may be a subclass of Predictor."""
    from tqdm import tqdm

    if batch_size < 1:
        raise PocketLMError(f"batch size {batch_size}: must be at least 1")
    if actors is not None and actors < 1:
        raise PocketLMError(f"--actors {actors}: needs at least 1")
    todo, skipped = todo_prompts(input_path, output_path)
    stats = BatchStats(answered=len(todo), skipped=skipped, output=str(output_path))
    if not todo:
        return stats
    _check_model(model)
    connect(address)
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-dataset banners; tqdm shows progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    node_cpus = [c for c in node_cpus if c > 0] or [1]
    load = dict(load or {})
    if actors is None:
        actors = len(node_cpus)
    # Each actor reserves the CPUs its engine threads use: given, or a fair share of a node.
    load.setdefault("threads", max(1, min(min(node_cpus), sum(node_cpus) // actors)))
    # Text and token-id prompts go in separate datasets: a Ray block has one type per column.
    kinds = [[i for i, (_, p) in enumerate(todo) if isinstance(p, str) == text] for text in (True, False)]
    datasets = [
        ray.data.from_items([{"row": i, "prompt": todo[i][1]} for i in rows]).map_batches(
            predictor,
            fn_constructor_kwargs={
                "model": model,
                "options": options,
                "batch_size": batch_size,
                "keep_prompt": False,
                **load,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=load["threads"],
        )
        for rows in kinds
        if rows
    ]
    written: set[int] = set()
    bar = tqdm(total=len(todo), desc="answering", unit="prompt", disable=not progress)
    try:
        with open(output_path, "a", encoding="utf-8") as out:
            for batch in (b for ds in datasets for b in ds.iter_batches(batch_size=None, batch_format="pandas")):
                records = []
                for row in batch.to_dict("records"):
                    i = int(row.pop("row"))
                    if i in written:  # a retried batch can never be written twice
                        continue
                    written.add(i)
                    key, prompt = todo[i]
                    records.append({"id": key, "prompt": prompt, **{k: _plain(v) for k, v in row.items()}})
                write_records(out, records)
                bar.update(len(records))
    except ray.exceptions.RayError as e:
        error = _pocketlm_error(e)
        if error is None:
            raise
        raise error from None
    finally:
        bar.close()
    return stats


def _plain(value: Any) -> Any:
    """A value Ray handed back (numpy scalars and arrays) as JSON's types."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
