"""`pocketlm run MODEL --input prompts.jsonl --output answers.jsonl`: many prompts, resumable.

Input lines are JSON objects with a "prompt" (text, or a list of token ids) and an optional
"id", or bare JSON strings. Each answer is appended to the output as soon as its batch is
done (and flushed to disk), keyed by the id (or the input line number); on a re-run,
prompts already answered are skipped, so an interrupted run just continues. Models whose
engine decodes prompts together (CTranslate2) get a batch at a time; the others go one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convert.core.errors import GenerationError

from .generation import GenerationOptions
from .model import Model


@dataclass
class BatchStats:
    answered: int
    skipped: int
    output: str


def read_prompts(path: Path) -> Iterator[tuple[Any, str | list[int]]]:
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
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    keys = set()
    for line in keep.decode("utf-8").splitlines():
        try:
            keys.add(json.dumps(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


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
    if output_path.is_dir():
        raise GenerationError(f"{output_path}: is a folder; --output needs a JSONL file")
    prompts = list(read_prompts(input_path))
    done = answered_keys(output_path)
    todo = [(key, p) for key, p in prompts if json.dumps(key) not in done]
    size = batch_size if model.batches_prompts else 1
    bar = tqdm(total=len(todo), desc="answering", unit="prompt", disable=not progress)
    with open(output_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            results = model.generate_batch([p for _, p in chunk], options)
            for (key, prompt), r in zip(chunk, results):
                record = {
                    "id": key,
                    "prompt": prompt,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": len(r.token_ids),
                }
                if r.score is not None:
                    record["score"] = r.score
                if r.others:  # num_return_sequences > 1: every answer, the first repeated
                    record["texts"] = [s.text for s in r.sequences]
                    record["completion_tokens"] = r.completion_tokens
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    bar.close()
    return BatchStats(answered=len(todo), skipped=len(prompts) - len(todo), output=str(output_path))
