"""`pocketlm run MODEL --input prompts.jsonl --output answers.jsonl`: many prompts, resumable.

Input lines are JSON objects with a "prompt" (text, or a list of token ids) and an optional
"id", or bare JSON strings. Each answer is appended to the output as soon as its batch is
done (and flushed to disk), keyed by the id (or the input line number); on a re-run,
prompts already answered are skipped, so an interrupted run just continues. Models whose
engine decodes prompts together (CTranslate2, or `parallel` sequences) get a batch at a
time; the others go one by one. Each record has the text, its token ids, the finish reason and
token counts (and the beam score, every answer with num_return_sequences > 1).
`run_jsonl` runs the job on one loaded model, runtime/serving/ray_cluster.py's `run_jsonl_on_ray`
over a Ray cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from pocketlm.converters.core.errors import GenerationError, OutputError, writing
from pocketlm.core.generation import GenerationOptions, GenerationResult
from pocketlm.core.model import Model, Prompt


@dataclass
class BatchStats:
    answered: int
    skipped: int
    output: str


def read_prompts(path: Path) -> Iterator[tuple[Any, Prompt]]:
    """(key, prompt) per non-empty input line; a malformed line is an error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path}: not UTF-8 text (byte {e.start}): expected JSONL") from None
    except OSError as e:
        raise GenerationError(f"{path}: cannot read: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(item, str):
            yield number, item
        elif isinstance(item, dict) and isinstance(item.get("prompt"), (str, list)):
            yield item.get("id", number), item["prompt"]
        else:
            raise GenerationError(f'{path}:{number}: expected a JSON string or an object with a "prompt"')


def answered_keys(path: Path) -> set[str]:
    """Keys already in the output; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if keep != data:
        with writing(path), open(path, "r+b") as f:
            f.truncate(len(keep))
    keys = set()
    for line in keep.decode("utf-8").splitlines():
        try:
            keys.add(json.dumps(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def answer(result: GenerationResult) -> dict[str, Any]:
    """What an output record (or a Ray Data row) says about one prompt's result: the first
    sequence as `GenerationResult.render` shows it (without log-probabilities), its tokens."""
    record = result.render(completion_tokens=len(result.token_ids))
    if result.others:  # num_return_sequences > 1: every answer, the first repeated
        record["texts"] = [s.text for s in result.sequences]
        record["completion_tokens"] = result.completion_tokens
    return record


def write_records(out: IO[str], records: list[dict[str, Any]]) -> None:
    """Append records as JSON lines, on disk (fsync) before returning: a kill loses no answer.
    A full or read-only disk is one line naming the file; what was written before stays."""
    with writing(out.name, note=" (the answers before are kept: the same command resumes)"):
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out.flush()
        os.fsync(out.fileno())


def todo_prompts(input_path: Path, output_path: Path) -> tuple[list[tuple[Any, Prompt]], int]:
    """The input's (key, prompt) pairs not answered in the output yet, and how many were."""
    if output_path.is_dir():
        raise GenerationError(f"{output_path}: is a folder; --output needs a JSONL file")
    prompts = list(read_prompts(input_path))
    done = answered_keys(output_path)
    todo = [(key, p) for key, p in prompts if json.dumps(key) not in done]
    return todo, len(prompts) - len(todo)


def run_jsonl(
    model: Model,
    input_path: Path,
    output_path: Path,
    batch_size: int = 16,
    progress: bool = False,
    options: GenerationOptions | None = None,
) -> BatchStats:
    if batch_size < 1:
        raise GenerationError(f"batch size {batch_size}: must be at least 1")
    todo, skipped = todo_prompts(input_path, output_path)
    size = batch_size if model.batches_prompts else 1
    bar = tqdm(total=len(todo), desc="answering", unit="prompt", disable=not progress)
    created = not output_path.exists()
    try:
        with writing(output_path):
            out = open(output_path, "a", encoding="utf-8")
        try:
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                results = model.generate_batch([p for _, p in chunk], options)
                write_records(out, [{"id": key, "prompt": p, **answer(r)} for (key, p), r in zip(chunk, results)])
                bar.update(len(chunk))
        finally:
            with contextlib.suppress(OSError):  # every record was flushed; after a failed one, closing fails again
                out.close()
    except OutputError:
        if created and output_path.is_file() and output_path.stat().st_size == 0:
            output_path.unlink()  # nothing was answered: no empty file is left behind
        raise
    finally:
        bar.close()
    return BatchStats(answered=len(todo), skipped=skipped, output=str(output_path))
