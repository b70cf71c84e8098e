"""llama.cpp's split GGUF files: one model in N files, read as one.

`gguf-split` (and gguf-py's `GGUFWriter(split_max_tensors=..., split_max_size=...)`) writes a
model as `<prefix>-00001-of-0000N.gguf` ... `<prefix>-0000N-of-0000N.gguf`. Every file holds
`split.no` (u16, 0-based), `split.count` (u16) and `split.tensors.count` (i32, the model's
tensors); the first also holds the model's metadata; each holds its own tensors, with offsets
into its own data. llama.cpp opens such a model by its first file and finds the others by
name (`llama_split_prefix`, then `llama_split_path` for each number, in src/llama.cpp), so the
names are part of the format: a renamed file is not found.

`read_model_header` takes any file of a model, split or not, and returns one header: the
first file's metadata, every file's tensors, and the files in order (the first is what
llama.cpp is given). It refuses, in one line, a missing file, files of different splits and
a tensor count that disagrees: llama.cpp would stop on them with a C++ exception message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import ModelLoadError
from .gguf_file import GGUFHeader, TensorEntry, read_header

SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
MAX_SPLITS = 2**16 - 1  # split.count is a u16
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_name(prefix: str, no: int, count: int) -> str:
    """The name of file `no` (0-based) of a model split in `count` files: llama_split_path's."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def split_parts(name: str) -> tuple[str, int, int] | None:
    """(prefix, 0-based number, count) of a split file's name; None for any other name."""
    m = _NAME.match(name)
    if m is None:
        return None
    no, count = int(m["no"]), int(m["count"])
    return (m["prefix"], no - 1, count) if 1 <= no <= count else None


def split_files(name: str) -> list[str]:
    """Every file name of the split model `name` (any of its files) belongs to, first first;
    [name] for a name that is not a split file's."""
    parts = split_parts(name)
    if parts is None:
        return [name]
    prefix, _, count = parts
    return [split_name(prefix, i, count) for i in range(count)]


@dataclass
class ModelHeader(GGUFHeader):
    """A GGUF model's header across its files: the first file's metadata and every file's
    tensors (each TensorEntry's offset is into its own file: `file_of`)."""

    files: list[Path] = field(default_factory=list)  # in order; one unless split
    shard_of: dict[str, int] = field(default_factory=dict)  # tensor name -> index in files

    @property
    def path(self) -> Path:
        """The file llama.cpp opens the model by (the first of a split)."""
        return self.files[0]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def file_of(self, tensor: TensorEntry) -> Path:
        return self.files[self.shard_of.get(tensor.name, 0)]


def model_files(header: GGUFHeader, path: str | Path) -> list[Path]:
    """The files of the model whose header (read from `path`) is `header`, first first."""
    return list(header.files) if isinstance(header, ModelHeader) else [Path(path)]


def _split_keys(header: GGUFHeader, path: Path) -> tuple[int, int] | None:
    """(number, count) from a file's split.* keys; None for a file that is not part of a split."""
    meta = header.metadata
    count = meta.get(SPLIT_COUNT)
    if count is None:
        return None
    if type(count) is not int or not 0 <= count <= MAX_SPLITS:
        raise ModelLoadError(f"{path}: corrupt GGUF ({SPLIT_COUNT}={count!r} is not a number of files)")
    if count <= 1:  # as llama.cpp: a split of one file is a plain file
        return None
    no = meta.get(SPLIT_NO)
    if type(no) is not int or not 0 <= no < count:
        raise ModelLoadError(f"{path}: corrupt GGUF ({SPLIT_NO}={no!r}, but {SPLIT_COUNT}={count})")
    return no, count


def read_model_header(path: str | Path) -> ModelHeader:
    """The header of the model `path` is a file of (any file of a split model), checked."""
    path = Path(path)
    header = read_header(path)
    keys = _split_keys(header, path)
    if keys is None:
        return ModelHeader(**vars(header), files=[path])
    no, count = keys
    expected = split_name("<name>", no, count)
    parts = split_parts(path.name)
    if parts is None or parts[1:] != (no, count):
        raise ModelLoadError(
            f"{path}: file {no + 1} of a model split in {count} files, but not named {expected} "
            "(llama.cpp finds the other files by that name)"
        )
    files = [path.with_name(name) for name in split_files(path.name)]
    missing = [f for f in files if not f.exists()]
    if missing:
        which = ", ".join(f"{f.name} (file {files.index(f) + 1})" for f in missing)
        raise ModelLoadError(
            f"{path}: file {no + 1} of a model split in {count} files, but {which} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}"
        )
    headers = [header if i == no else read_header(f) for i, f in enumerate(files)]
    merged = ModelHeader(**vars(headers[0]), files=files)
    merged.tensors = []
    for i, (f, h) in enumerate(zip(files, headers)):
        if _split_keys(h, f) != (i, count):
            stated = h.metadata.get(SPLIT_NO), h.metadata.get(SPLIT_COUNT)
            raise ModelLoadError(
                f"{f}: says it is file {_plus_one(stated[0])} of {stated[1]}, not {i + 1} of {count} "
                "(files of different splits?)"
            )
        for t in h.tensors:
            if t.name in merged.shard_of:
                raise ModelLoadError(f"{f}: tensor {t.name} is also in {files[merged.shard_of[t.name]].name}")
            merged.shard_of[t.name] = i
            merged.tensors.append(t)
    total = headers[0].metadata.get(SPLIT_TENSORS)
    if total != len(merged.tensors):
        raise ModelLoadError(
            f"{files[0]}: {SPLIT_TENSORS}={total!r}, but its {count} files hold {len(merged.tensors)} tensors"
        )
    return merged


def _plus_one(value: object) -> object:
    return value + 1 if type(value) is int else value
