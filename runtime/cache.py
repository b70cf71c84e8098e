"""PocketLM's cache of converted models: a checkpoint is converted once, then reused.

An entry is keyed by the sha256 of the source files' contents, the output format and quant
type and the converter version, so editing the checkpoint or upgrading PocketLM converts
again. Each entry holds the model and a `manifest.json` (source repo and revision when
known, sha256 of every input and of the output, quant, converter version). Before reuse the
output is checked against the manifest (re-hashed whenever its size or mtime changed): a
corrupted entry is rebuilt. Content hashes are remembered per (path, size, mtime), so a
cache hit costs no re-hashing.

Location: $POCKETLM_CACHE, else `pocketlm/` next to the Hugging Face hub cache ($HF_HOME,
default ~/.cache/huggingface).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.core import __version__
from convert.core.formats import FORMATS

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock; conversions are still atomic
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    if os.environ.get("POCKETLM_CACHE"):
        return Path(os.environ["POCKETLM_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "pocketlm"


class _HashMemo:
    """sha256 of files, remembered by (path, size, mtime) in the cache's hashes.json."""

    def __init__(self) -> None:
        self.path = cache_root() / "hashes.json"
        try:
            self.known: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self.known = {}
        self.dirty = False

    def sha256(self, file: Path) -> str:
        from convert.checkpoint import sha256_file

        stat = file.stat()
        key = str(file.resolve())
        known = self.known.get(key)
        if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return known["sha256"]
        digest = sha256_file(file)
        self.known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.path)


def _files(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*") if p.is_file()) if output.is_dir() else [output]


def output_sha256(output: Path, memo: _HashMemo) -> str:
    """One digest for a model file or folder (the folder's files, by name and content)."""
    if output.is_file():
        return memo.sha256(output)
    h = hashlib.sha256()
    for f in _files(output):
        h.update(f"{f.relative_to(output)}\0{memo.sha256(f)}\n".encode())
    return h.hexdigest()


def entry_key(hashes: dict[str, str], fmt: str, quant: str) -> str:
    blob = json.dumps({"files": hashes, "format": fmt, "quant": quant, "converter": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise work on one entry across processes (two servers starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_UN)


def _valid(entry: Path, memo: _HashMemo) -> Path | None:
    """The entry's output if its manifest is there and the output matches it."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    output = entry / manifest.get("output", "")
    if not output.exists() or output == entry:
        return None
    if output_sha256(output, memo) != manifest.get("output_sha256"):
        log.warning("cached conversion %s does not match its manifest (corrupted?); rebuilding it", entry.name)
        return None
    return output


def converted(folder: Path, fmt: str, quant: str, progress: bool = False) -> Path:
    """The cached conversion of `folder` to `fmt`/`quant`, converting it first if needed."""
    from convert import convert
    from convert.checkpoint import Checkpoint, source_identity

    memo = _HashMemo()
    with Checkpoint(folder) as ckpt:
        hashes = {f.name: memo.sha256(f) for f in ckpt.source_files()}
        repo, revision = source_identity(folder, ckpt.config)
    key = entry_key(hashes, fmt, quant)
    root = cache_root() / "converted"
    entry = root / key
    try:
        with _locked(root / f".{key}.lock"):
            output = _valid(entry, memo)
            if output is not None:
                return output
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir(parents=True)
            output = entry / FORMATS[fmt].output_name("model")
            if progress:
                print(f"converting {repo or folder} to {fmt} {quant} (first use; cached in {entry})", flush=True)
            summary = convert(folder, output, quant=quant, format=fmt, force=True, progress=progress)
            manifest = {
                "source": {"repo": repo, "revision": revision, "folder": str(folder.resolve()), "sha256": hashes},
                "format": fmt,
                "quant": quant,
                "converter_version": __version__,
                "output": output.name,
                "output_sha256": output_sha256(output, memo),
                "size_bytes": summary.size_bytes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            tmp = entry / "manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, entry / "manifest.json")  # written last: an entry without it is incomplete
            return output
    finally:
        memo.save()


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def source(self) -> str:
        src = self.manifest.get("source", {})
        if src.get("repo"):
            return src["repo"] + (f"@{src['revision'][:12]}" if src.get("revision") else "")
        return src.get("folder", "?")

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in _files(self.path))


def entries() -> list[Entry]:
    """Complete conversions in the cache (entries without a manifest are ignored)."""
    out = []
    for manifest in sorted((cache_root() / "converted").glob("*/manifest.json")):
        try:
            out.append(Entry(manifest.parent.name, manifest.parent, json.loads(manifest.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def remove(selector: str) -> list[Entry]:
    """Remove entries whose key starts with `selector` or whose source repo is `selector`."""
    matched = [
        e for e in entries() if e.key.startswith(selector) or e.manifest.get("source", {}).get("repo") == selector
    ]
    for e in matched:
        shutil.rmtree(e.path, ignore_errors=True)
    return matched
