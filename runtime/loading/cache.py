"""PocketLM's cache of converted models: a checkpoint is converted once, then reused.

An entry is keyed by the sha256 of the source files' contents, the output format and quant
type and the converter version, so editing the checkpoint or upgrading PocketLM converts
again. Each entry holds the model and a `manifest.json` (source repo and revision when
known, sha256 of every input and of the output, quant, converter version). Before reuse the
output is checked against the manifest (re-hashed whenever its size or mtime changed): a
corrupted entry is rebuilt. Content hashes are remembered per (path, size, mtime), so a
cache hit costs no re-hashing. A manifest, hashes.json or model metadata that is not the JSON
PocketLM wrote (any shape or type) makes a broken entry: rebuilt with a warning, listed as
broken, removable. A cache that cannot be written is one error line naming it; one that is
read-only still serves the entries it holds.

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

from pocketlm.converters.core import __version__
from pocketlm.converters.core.errors import PocketLMError, first_line, write_failure, writing
from pocketlm.converters.core.formats import FORMATS
from pocketlm.converters.core.gguf_split import split_files
from pocketlm.converters.core.jsonfile import OPTIONAL_STRING, Each, MalformedJSON, Shape, read_json

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


HASHES_SHAPE = Each({"size": int, "mtime_ns": int, "sha256": str})
MANIFEST_SHAPE: dict[str, Shape] = {
    "output": str,
    "output_sha256": str,
    "format?": str,
    "quant?": str,
    "converter_version?": str,
    "created?": str,
    "size_bytes?": int,
    "source?": {"repo?": OPTIONAL_STRING, "revision?": OPTIONAL_STRING, "folder?": str, "sha256?": Each(str)},
}


class _HashMemo:
    """sha256 of files, remembered by (path, size, mtime) in the cache's hashes.json."""

    def __init__(self) -> None:
        self.path = cache_root() / "hashes.json"
        self.known: dict[str, Any] = {}
        self.dirty = False
        try:
            self.known = read_json(self.path, HASHES_SHAPE)
        except (FileNotFoundError, NotADirectoryError):  # no memo yet
            pass
        except (OSError, MalformedJSON) as e:  # rewritten whole on the next save
            why = e if isinstance(e, MalformedJSON) else f"{self.path}: unreadable ({e.strerror or e})"
            log.warning("%s; the files it remembered are hashed again", why)
            self.dirty = True

    def sha256(self, file: Path) -> str:
        from pocketlm.converters.checkpoint import sha256_file

        stat = file.stat()
        key = str(file.resolve())
        known = self.known.get(key)
        if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return known["sha256"]
        digest = sha256_file(file)
        self.known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self, quiet: bool = False) -> None:
        """Write what was learned (a memo: when it cannot be written, files are hashed again)."""
        if not self.dirty:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not quiet:
                log.warning("%s; files will be hashed again next time", write_failure(self.path, e))


def read_manifest(entry: Path) -> dict[str, Any]:
    """An entry's manifest. OSError when it has none (an incomplete entry), MalformedJSON when
    it is not what PocketLM writes (a broken entry)."""
    path = entry / "manifest.json"
    try:
        manifest: dict[str, Any] = read_json(path, MANIFEST_SHAPE)
    except IsADirectoryError:
        raise MalformedJSON(f"{path}: a folder, not a file") from None
    name = manifest["output"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise MalformedJSON(f"{path}: output {name!r} is not a file name in the entry")
    return manifest


def _files(output: Path) -> list[Path]:
    """A model's files: a folder's, or a file and the other files of its split (in order)."""
    if output.is_dir():
        return sorted(p for p in output.rglob("*") if p.is_file())
    return [output.with_name(name) for name in split_files(output.name)]


def output_sha256(output: Path, memo: _HashMemo) -> str:
    """One digest for a model file, the files of a split model (named by its first) or a folder
    (the folder's files): each file's name and content, in order."""
    files = _files(output)
    if files == [output]:
        return memo.sha256(output)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(output if output.is_dir() else output.parent)}\0{memo.sha256(f)}\n".encode())
    return h.hexdigest()


def entry_key(hashes: dict[str, str], fmt: str, quant: str) -> str:
    blob = json.dumps({"files": hashes, "format": fmt, "quant": quant, "converter": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise work on one entry across processes (two servers starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_UN)


def _valid(entry: Path, memo: _HashMemo) -> Path | None:
    """The entry's output if its manifest is there and the output matches it."""
    from pocketlm.converters.core.ct2_file import read_folder_metadata

    try:
        manifest = read_manifest(entry)
    except OSError:  # no manifest: absent, or a conversion that did not finish
        return None
    except MalformedJSON as e:
        log.warning("cached conversion %s is broken (%s); rebuilding it", entry.name, e)
        return None
    output = entry / manifest["output"]
    try:
        lacking = [f for f in _files(output) if not f.exists()] if output.exists() else [output]
        if lacking:
            log.warning("cached conversion %s lacks its model's %s; rebuilding it", entry.name, lacking[0].name)
            return None
        if output.is_dir():
            read_folder_metadata(output)
        if output_sha256(output, memo) != manifest["output_sha256"]:
            log.warning("cached conversion %s does not match its manifest (corrupted?); rebuilding it", entry.name)
            return None
    except (OSError, PocketLMError) as e:
        log.warning("cached conversion %s is broken (%s); rebuilding it", entry.name, first_line(e))
        return None
    return output


def converted(folder: Path, fmt: str, quant: str, progress: bool = False) -> Path:
    """The cached conversion of `folder` to `fmt`/`quant`, converting it first if needed."""
    memo = _HashMemo()
    try:
        output = _converted(folder, fmt, quant, progress, memo)
    except BaseException:
        memo.save(quiet=True)  # the error is the one line to show
        raise
    memo.save()
    return output


def _converted(folder: Path, fmt: str, quant: str, progress: bool, memo: _HashMemo) -> Path:
    from pocketlm.converters.checkpoint import Checkpoint, source_identity

    with Checkpoint(folder) as ckpt:
        hashes = {f.name: memo.sha256(f) for f in ckpt.source_files()}
        repo, revision = source_identity(folder, ckpt.config)
    key = entry_key(hashes, fmt, quant)
    root = cache_root() / "converted"
    entry = root / key
    with contextlib.ExitStack() as locked:
        try:
            locked.enter_context(_locked(root / f".{key}.lock"))
        except OSError as e:
            output = _valid(entry, memo)  # a read-only cache still serves what it holds
            if output is not None:
                return output
            raise write_failure(root, e, note=" (the conversion cache: POCKETLM_CACHE can move it)") from None
        output = _valid(entry, memo)
        if output is not None:
            return output
        with writing(entry, "replace"):
            if entry.exists():
                shutil.rmtree(entry)
            entry.mkdir(parents=True)
        try:
            return _build(entry, folder, fmt, quant, progress, memo, hashes, repo, revision)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)  # an entry without its manifest would be a leftover
            raise


def _build(
    entry: Path,
    folder: Path,
    fmt: str,
    quant: str,
    progress: bool,
    memo: _HashMemo,
    hashes: dict[str, str],
    repo: str | None,
    revision: str | None,
) -> Path:
    from pocketlm.converters import convert

    if progress:
        print(f"converting {repo or folder} to {fmt} {quant} (first use; cached in {entry})", flush=True)
    asked = entry / FORMATS[fmt].output_name("model")
    summary = convert(folder, asked, quant=quant, format=fmt, force=True, progress=progress)
    output = Path(summary.output)  # a split model: its first file, the others beside it
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
    path = entry / "manifest.json"
    tmp = entry / "manifest.json.tmp"
    with writing(path, note=" (the conversion was not kept)"):
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)  # written last: an entry without it is incomplete
    return output


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]
    broken: str | None = None  # why the manifest is not what PocketLM writes

    @property
    def source(self) -> str:
        src = self.manifest.get("source", {})
        if src.get("repo"):
            return src["repo"] + (f"@{src['revision'][:12]}" if src.get("revision") else "")
        return src.get("folder", "?")

    @property
    def size_bytes(self) -> int:
        total = 0
        for f in _files(self.path):
            with contextlib.suppress(OSError):
                total += f.stat().st_size
        return total


def entries() -> list[Entry]:
    """Conversions in the cache that finished (have a manifest), broken ones included;
    entries without a manifest (incomplete, or being written) are left out."""
    out = []
    for manifest in sorted((cache_root() / "converted").glob("*/manifest.json")):
        entry = manifest.parent
        try:
            out.append(Entry(entry.name, entry, read_manifest(entry)))
        except MalformedJSON as e:
            out.append(Entry(entry.name, entry, {}, broken=str(e)))
        except OSError as e:
            out.append(Entry(entry.name, entry, {}, broken=f"{manifest}: unreadable ({e.strerror or e})"))
    return out


MIN_KEY_PREFIX = 4  # so that `rm ""` or `rm a` cannot empty the cache


def remove(selector: str) -> list[Entry]:
    """Remove entries whose key starts with `selector` (at least MIN_KEY_PREFIX characters) or
    whose source repo is `selector`."""
    by_key = len(selector) >= MIN_KEY_PREFIX
    matched = [
        e
        for e in entries()
        if (by_key and e.key.startswith(selector)) or e.manifest.get("source", {}).get("repo") == selector
    ]
    for e in matched:
        with writing(e.path, "remove"):
            shutil.rmtree(e.path)
    return matched
