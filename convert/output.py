"""Writing outputs safely, and the summary every conversion returns.

Outputs are built under a temporary name in the destination folder and renamed into place
only once complete and verified, so an interrupted conversion never leaves a file (or folder)
that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .core.ct2_file import written_by_pocketlm
from .core.errors import WRITE_ERRORS, OutputExistsError, PocketLMError, write_failure
from .core.gguf_split import split_parts

PARTIAL_SUFFIX = ".partial"


@dataclass
class Fallback:
    tensor: str
    wanted: str
    used: str
    reason: str


@dataclass
class ConversionSummary:
    output: str
    format: str
    quant: str
    architecture: str
    tensors: int
    types: dict[str, int]
    size_bytes: int
    seconds: float
    fallbacks: list[Fallback] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    imatrix: str | None = None  # the importance matrix the quantizer used, and where it was kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The human summary printed by `pocketlm convert`."""
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        lines = [
            f"wrote {self.output}",
            f"  {self.architecture} -> {self.format} {self.quant}: {self.tensors} tensors ({types})",
            f"  {self.size_bytes / 2**20:.1f} MiB in {self.seconds:.1f} s",
        ]
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} tensors kept a wider type (rows not a multiple of the block size):")
            shown = self.fallbacks[:8]
            lines += [f"    {f.tensor}: {f.used} instead of {f.wanted} ({f.reason})" for f in shown]
            if len(self.fallbacks) > len(shown):
                lines.append(f"    ... and {len(self.fallbacks) - len(shown)} more")
        if self.imatrix:
            lines.append(f"  importance matrix: {self.imatrix}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def partial_path(dest: Path, tag: str = "") -> Path:
    """A temporary sibling of `dest`; hidden, and recognisably ours for later clean-up."""
    return dest.with_name(f".{dest.name}{tag}.{os.getpid()}{PARTIAL_SUFFIX}")


def partial_sibling(tmp: Path, tag: str) -> Path:
    """Another temporary for the destination `tmp` stands for (e.g. an intermediate file)."""
    base = tmp.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[0]
    return tmp.with_name(f"{base}{tag}.{os.getpid()}{PARTIAL_SUFFIX}")


def output_path(dest: str | Path) -> Path:
    """`dest` with a file name: `.`, `..` and `/` name folders, resolved to say which."""
    dest = Path(dest)
    return dest.resolve() if dest.name in ("", ".", "..") else dest


def _check_apart(dest: Path, src: Path) -> None:
    """The output must never be an input, lie inside one, or hold one."""
    out, given = dest.resolve(), Path(src).resolve()
    same = out == given
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(out, given)
    if same:
        raise OutputExistsError(f"{dest}: this is the input {src}; the output needs a path of its own")
    if given in out.parents:
        raise OutputExistsError(f"{dest}: inside the input folder {src}; write the output elsewhere")
    if out in given.parents:
        raise OutputExistsError(f"{dest}: holds the input {src}; the output needs a path of its own")


def check_writable(dest: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """The output path, once it is known that writing it harms nothing.

    `--force` replaces a file, or a folder PocketLM wrote (its pocketlm.json says so); never
    another folder, never an input (nor what holds one or lies inside one)."""
    dest = output_path(dest)
    if not dest.name:
        raise OutputExistsError(f"{dest}: not a path a model can be written to")
    for src in inputs:
        if src is not None:
            _check_apart(dest, Path(src))
    if dest.is_dir() and not dest.is_symlink() and not written_by_pocketlm(dest):
        raise OutputExistsError(
            f"{dest}: a folder PocketLM did not write (--force replaces only files and PocketLM's own output "
            "folders); name a new output path"
        )
    if (dest.exists() or dest.is_symlink()) and not force:
        raise OutputExistsError(f"{dest}: already exists (use --force to overwrite)")
    if not dest.parent.is_dir():
        raise OutputExistsError(f"{dest.parent}: output folder does not exist")
    return dest


def remove(path: Path) -> None:
    """Remove a temporary if it is there (best effort: what cannot be removed stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_partials(dest: Path) -> None:
    """Remove temporaries left next to `dest` by conversions that were killed (SIGKILL, power
    loss): their process is gone, so nothing else will."""
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}*{PARTIAL_SUFFIX}"):
        pid = stale.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            remove(stale)


def _is_output(name: object, dest: Path) -> bool:
    """Whether an OSError's file is `dest`, one of its temporaries, or inside them."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    path = Path(name)
    for p in (path, *path.parents):
        if p.parent == dest.parent and (
            p.name == dest.name or (p.name.startswith(f".{dest.name}") and p.name.endswith(PARTIAL_SUFFIX))
        ):
            return True
    return False


@contextlib.contextmanager
def atomic_output(dest: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `dest`, on any failure it is removed.

    A replaced output stays in place until the new one is complete (a folder is set aside
    under a temporary name for the moment of the swap, then removed)."""
    dest = check_writable(dest, force, inputs)
    tmp = partial_path(dest)
    old = partial_path(dest, ".replaced")
    try:
        remove_stale_partials(dest)
        remove(tmp)
        yield tmp
        check_writable(dest, force)  # again: the path may have changed while the output was written
        if dest.is_dir() and not dest.is_symlink():  # os.replace cannot replace a non-empty folder
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old, dest)
                raise
            remove(old)
        else:
            os.replace(tmp, dest)
    except OSError as e:
        if _is_output(e.filename, dest) or (e.filename is None and e.errno in WRITE_ERRORS):
            raise write_failure(dest, e, note=" (nothing was left behind)") from None
        if e.errno in WRITE_ERRORS:  # another file (an input read on the way): name it
            raise PocketLMError(f"{e.filename}: {e.strerror or e}") from None
        raise
    finally:
        remove(tmp)


@contextlib.contextmanager
def atomic_split_output(
    dest: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """`atomic_output` for a model written as llama.cpp's split files named after `dest`
    (`<stem>-00001-of-0000N.gguf` ..., or `dest` itself when it fits in one file): yield the
    path to write them around, in a temporary folder; on success the files move beside `dest`,
    the first last (llama.cpp opens a split model by its first file, so once it is there the
    others are), and files of an older split of the same name go; on failure nothing stays."""
    dest = check_writable(dest, force, inputs)
    older = split_siblings(dest)
    if older and not force:
        raise OutputExistsError(f"{older[0]}: already exists (use --force to overwrite)")
    tmp = partial_path(dest)
    try:
        remove_stale_partials(dest)
        remove(tmp)
        tmp.mkdir()
        yield tmp / dest.name
        written = split_siblings(tmp / dest.name) or [tmp / dest.name]
        check_writable(dest, force)
        for stale in [*older, dest]:
            if stale.name not in {w.name for w in written}:
                remove(stale)
        for file in [*written[1:], written[0]]:
            os.replace(file, dest.parent / file.name)
    except OSError as e:
        if _is_output(e.filename, dest) or (e.filename is None and e.errno in WRITE_ERRORS):
            raise write_failure(dest, e, note=" (nothing was left behind)") from None
        raise
    finally:
        remove(tmp)


def split_siblings(path: Path) -> list[Path]:
    """The split files named after `path` (`<stem>-00001-of-0000N.gguf` ...) in its folder, in order."""
    found = path.parent.glob(f"{glob.escape(path.stem)}-*-of-*.gguf")
    return sorted(p for p in found if (split_parts(p.name) or ("",))[0] == path.stem)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
