"""Writing outputs safely, and the summary every conversion returns.

Outputs are built under a temporary name in the destination folder and renamed into place
only once complete and verified, so an interrupted conversion never leaves a file (or folder)
that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputExistsError

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
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def partial_path(dest: Path, tag: str = "") -> Path:
    """A temporary sibling of `dest`; hidden, and recognisably ours for later clean-up."""
    return dest.with_name(f".{dest.name}{tag}.{os.getpid()}{PARTIAL_SUFFIX}")


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


@contextlib.contextmanager
def atomic_output(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `dest`, on any failure it is removed."""
    dest = Path(dest)
    check_writable(dest, force)
    tmp = partial_path(dest)
    remove(tmp)
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            remove(dest)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, dest)
    finally:
        remove(tmp)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
