"""`convert()`: a Hugging Face checkpoint folder in, a runnable model out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .architectures import resolve
from .checkpoint import Checkpoint, read_json, sha256_file, source_identity
from .core import __version__
from .core import generation_config as gen_config
from .core.errors import PocketLMError
from .core.formats import FORMATS, gguf_quant_type, tensor_type
from .ct2_target import source_float_dtype, write_ct2
from .gguf_target import SplitLimits, convert_gguf, describe_types, fallbacks, written_files
from .imatrix import is_gguf
from .imatrix import saved_name as imatrix_saved_name
from .output import ConversionSummary, Fallback, atomic_output, atomic_split_output, check_writable

log = logging.getLogger(__name__)


def default_output(src: Path, fmt: str, quant: str) -> Path:
    return Path.cwd() / FORMATS[fmt].output_name(src.resolve().name, quant)


def provenance(ckpt: Checkpoint, quant: str) -> dict[str, Any]:
    """Where the model came from, which converter made it, and the sha256 of every input file."""
    repo, revision = source_identity(ckpt.folder, ckpt.config)
    files = ckpt.source_files()
    return {
        "name": repo.split("/")[-1] if repo else ckpt.folder.resolve().name,
        "converter": "pocketlm",
        "converter_version": __version__,
        "quant": quant,
        "source": {
            "repo": repo,
            "revision": revision,
            "files": {f.name: sha256_file(f) for f in files},
        },
    }


def _gguf_metadata(prov: dict[str, Any]) -> Callable[[gguf.GGUFWriter], None]:
    def add(w: gguf.GGUFWriter) -> None:
        src = prov["source"]
        w.add_name(prov["name"])
        if src["repo"]:
            w.add_string(gguf.Keys.General.SOURCE_URL, f"https://huggingface.co/{src['repo']}")
            w.add_string("pocketlm.source.repo", src["repo"])
        if src["revision"]:
            w.add_string("pocketlm.source.revision", src["revision"])
        w.add_string("pocketlm.converter", prov["converter"])
        w.add_string("pocketlm.converter_version", prov["converter_version"])
        w.add_string("pocketlm.quant", prov["quant"])
        w.add_array("pocketlm.source.files", list(src["files"]))
        w.add_array("pocketlm.source.sha256", list(src["files"].values()))
        if prov.get(gen_config.METADATA_KEY):  # the checkpoint's generation config, as JSON text
            w.add_string(gen_config.GGUF_KEY, json.dumps(prov[gen_config.METADATA_KEY], ensure_ascii=False))

    return add


Written = tuple[dict[str, int], list[Fallback]]  # tensors per stored type, tensors that kept a wider type


@dataclass(frozen=True)
class WriteJob:
    """What a format's writer needs besides the plan and the temporary output."""

    quant: str
    ckpt: Checkpoint
    prov: dict[str, Any]
    dest: Path  # the final output: a computed importance matrix is kept beside it
    progress: bool = False
    threads: int | None = None
    output_type: str | None = None
    imatrix: Path | None = None
    split: SplitLimits | None = None


def _write_gguf(plan: Any, tmp: Path, job: WriteJob) -> Written:
    qt = gguf_quant_type(job.quant)
    head = tensor_type(job.output_type) if job.output_type else None
    source_dtypes = {job.ckpt.info(s).dtype for t in plan.tensors for s in t.sources}
    types = convert_gguf(
        plan,
        tmp,
        qt,
        _gguf_metadata(job.prov),
        job.ckpt.release,
        source_dtypes,
        job.progress,
        job.threads,
        head,
        job.imatrix,
        imatrix_saved_name(job.dest),
        job.split,
    )
    return describe_types(types), fallbacks(plan, types, qt)


def _write_ct2(plan: Any, tmp: Path, job: WriteJob) -> Written:
    if job.output_type:
        raise PocketLMError("--output-type is a GGUF option (CTranslate2 quantizes every matrix alike)")
    if job.imatrix:
        raise PocketLMError("--imatrix is a GGUF option (it guides llama.cpp's quantizer)")
    if job.split:
        raise PocketLMError("--split-max-size and --split-max-tensors are GGUF options (llama.cpp's split files)")

    def source_dtype(t: Any) -> str:
        return source_float_dtype({job.ckpt.info(s).dtype for s in t.sources})

    return write_ct2(plan, tmp, job.quant, source_dtype, job.ckpt.release, job.prov, job.progress), []


WRITERS: dict[str, Callable[..., Written]] = {"gguf": _write_gguf, "ct2": _write_ct2}  # by format


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def convert(
    src: str | Path,
    output: str | Path | None = None,
    quant: str | None = None,
    format: str | None = None,
    force: bool = False,
    progress: bool = False,
    threads: int | None = None,
    output_type: str | None = None,
    imatrix: str | Path | None = None,
    split_max_size: int | None = None,
    split_max_tensors: int | None = None,
) -> ConversionSummary:
    """Convert the Hugging Face checkpoint folder `src` and return what was written.

    `format` defaults to the architecture's first target (GGUF for BLOOM, CTranslate2 for the
    T5 family); `quant` to the architecture's default for that format (`pocketlm convert
    --help` lists them: BLOOM GGUF q4_k_m, T5 CTranslate2 int8, T5 GGUF q8_0).
    `output_type` (GGUF) gives the output head its own tensor type (`TENSOR_TYPES`).
    `imatrix` (GGUF, llama.cpp's quantizer types): a calibration text, whose importance
    matrix is computed and kept beside the output as `<stem>.imatrix.gguf`, or such a file.
    `split_max_size` (bytes of tensor data per file) and `split_max_tensors` (GGUF) write
    llama.cpp's split files `<stem>-00001-of-0000N.gguf` ... beside `output` (whose name is
    then the files' stem): `output` in the summary is the first, which llama.cpp and
    `pocketlm.load` open. The output appears only once complete and verified. `force` lets it replace a file, or a
    folder PocketLM wrote (a CTranslate2 output); never another folder, never an input.
    """
    started = time.perf_counter()
    if any(limit is not None and limit <= 0 for limit in (split_max_size, split_max_tensors)):
        raise PocketLMError("--split-max-size and --split-max-tensors must be above 0")
    split = SplitLimits(split_max_size or 0, split_max_tensors or 0)
    src = Path(src)
    if (src / "config.json").is_file():  # an unsupported architecture is the first thing to say
        resolve(read_json(src / "config.json"), str(src / "config.json"))
    with Checkpoint(src) as ckpt:
        arch = resolve(ckpt.config, str(src / "config.json"))
        fmt, target = arch.target(format)
        quant_name = arch.quant(fmt.name, quant)
        dest = Path(output) if output is not None else default_output(src, fmt.name, quant_name)
        inputs = (src, imatrix)
        dest = check_writable(dest, force, inputs)  # now: planning can take a while
        plan = target.plan(ckpt)  # validates every tensor before anything is written
        prov = {**provenance(ckpt, quant_name), "architecture": arch.name}
        generation, _, generation_warnings = gen_config.read(ckpt.folder, ckpt.config)
        if generation:  # stored as read (GGUF: a key; CTranslate2: pocketlm.json), mapped by the runtime
            prov[gen_config.METADATA_KEY] = generation
        writing = atomic_split_output if split else atomic_output
        with writing(dest, force, inputs) as tmp:
            job = WriteJob(
                quant_name, ckpt, prov, dest, progress, threads, output_type, Path(imatrix) if imatrix else None, split
            )
            types, fallback_list = WRITERS[fmt.name](plan, tmp, job)
            size = _size(tmp.parent if split else tmp)
    return ConversionSummary(
        output=str(written_files(dest)[0] if split else dest),
        format=fmt.name,
        quant=quant_name,
        architecture=arch.name,
        tensors=sum(types.values()),
        types=types,
        size_bytes=size,
        seconds=time.perf_counter() - started,
        fallbacks=fallback_list,
        warnings=[*plan.warnings, *generation_warnings],
        imatrix=_imatrix_note(Path(imatrix), dest) if imatrix else None,
    )


def _imatrix_note(spec: Path, dest: Path) -> str:
    return spec.name if is_gguf(spec) else f"computed over {spec.name}, kept as {imatrix_saved_name(dest)}"
