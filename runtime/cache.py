"""PocketLM's cache of converted models: a checkpoint folder is converted once, then reused.

An entry is keyed by the sha256 of the source files' contents, the output format and quant
type and the converter version, so editing the checkpoint or upgrading PocketLM converts
again. Content hashes are remembered per (path, size, mtime) so a cache hit costs no
re-hashing. Each entry holds the model and a `manifest.json` saying where it came from.
Location: $POCKETLM_CACHE, else ~/.cache/pocketlm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from convert import __version__

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock, conversions are still atomic
    fcntl = None  # type: ignore[assignment]


def cache_root() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm")


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    from convert.checkpoint import sha256_file

    stat = path.stat()
    key = str(path.resolve())
    known = memo.get(key)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    digest = sha256_file(path)
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest


def source_files(folder: Path) -> list[Path]:
    """The files a conversion reads (config, tokenizer, weights): what the cache key covers."""
    from convert.checkpoint import Checkpoint

    with Checkpoint(folder) as ckpt:
        return ckpt.source_files()


def source_hashes(folder: Path) -> dict[str, str]:
    memo_path = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    hashes = {f.name: _file_sha256(f, memo) for f in source_files(folder)}
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return hashes


def entry_key(hashes: dict[str, str], fmt: str, quant: str) -> str:
    blob = json.dumps({"files": hashes, "format": fmt, "quant": quant, "converter": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise conversions of one entry across processes (two servers starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_UN)


def converted(folder: Path, fmt: str, quant: str, progress: bool = False) -> Path:
    """The cached conversion of `folder` to `fmt`/`quant`, converting it first if needed."""
    from convert import convert

    hashes = source_hashes(folder)
    key = entry_key(hashes, fmt, quant)
    entry = cache_root() / "converted" / key
    output = entry / ("model.gguf" if fmt == "gguf" else "model")
    with _locked(cache_root() / "converted" / f".{key}.lock"):
        if (entry / "manifest.json").is_file() and output.exists():
            return output
        entry.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"converting {folder} to {fmt} {quant} (first use; cached in {entry})", flush=True)
        summary = convert(folder, output, quant=quant, format=fmt, force=True, progress=progress)
        manifest = {
            "source": str(folder.resolve()), "source_sha256": hashes, "format": fmt, "quant": quant,
            "converter_version": __version__, "output": output.name, "size_bytes": summary.size_bytes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = entry / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, entry / "manifest.json")  # written last: an entry without it is incomplete
    return output
