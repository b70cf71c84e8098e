"""Writing outputs safely, and the summary every conversion returns.

Outputs are built under a temporary name in the destination folder and renamed into place
only once complete and verified, so an interrupted conversion never leaves a file (or folder)
that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import OutputError, OutputExistsError

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


def check_writable(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest}: already exists (use --force to overwrite)")
    if not dest.parent.is_dir():
        raise OutputExistsError(f"{dest.parent}: output folder does not exist")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
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


WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file is too large for this file system or limit",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


@contextlib.contextmanager
def atomic_output(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `dest`, on any failure it is removed."""
    dest = Path(dest)
    check_writable(dest, force)
    remove_stale_partials(dest)
    tmp = partial_path(dest)
    remove(tmp)
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            remove(dest)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, dest)
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise OutputError(f"{dest}: cannot write it: {WRITE_ERRORS[e.errno]} (nothing was left behind)") from None
        raise
    finally:
        remove(tmp)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
