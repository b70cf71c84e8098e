"""The converter's command line: `python -m pocketlm.converters SRC ...`, also `pocketlm convert` and
`pocketlm quantize`. Help texts are built from the architecture registry and format table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .core.cli import EXIT_STATUS, guarded, setup_logging

DESCRIPTION = (
    "Convert a Hugging Face checkpoint folder (safetensors or pytorch_model.bin, single or sharded) "
    "into a model PocketLM runs."
)


def convert_epilog() -> str:
    """The architectures, their formats with default quants, and every quant type."""
    from .architectures import architectures
    from .core.formats import FORMATS

    lines = ["architectures (formats, the first is the default; default quant types)"]
    for arch in architectures():
        targets = ", ".join(f"{FORMATS[f].title} {arch.quant(f)}" for f in arch.targets)
        lines.append(f"  {arch.name:<8}{arch.family}: {targets}")
    lines.append("quant types")
    for fmt in FORMATS.values():
        lines.append(f"  {fmt.title + ':':<13}{' '.join(fmt.quants)}")
        lines.append(f"  {'':<13}({fmt.quant_help})")
    lines.append("GGUF tensors whose rows do not fit a type's block keep a wider type; the summary lists them.")
    return "\n".join(lines)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    from .core.formats import FORMATS

    names = sorted({a for f in FORMATS.values() for a in (f.name, *f.aliases)})
    p.add_argument("src", help="checkpoint folder (with config.json)")
    p.add_argument(
        "-o", "--output", help="output file or folder (default: ./<folder>-<quant>.gguf or ./<folder>-ct2-<quant>)"
    )
    p.add_argument("-q", "--quant", default=None, help="quant type (default: the architecture's, listed below)")
    p.add_argument(
        "--format", default=None, choices=names, help="output format (default: the architecture's first, listed below)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace the output if it is a file, or a folder PocketLM wrote"
    )
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer")
    _add_output_type(p)
    _add_imatrix(p)
    p.add_argument(
        "--split-max-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="GGUF: write llama.cpp's split files (<stem>-00001-of-0000N.gguf ...) of at most SIZE of tensors each "
        "(e.g. 2G, 500M; K/M/G are powers of 1000, as gguf-split reads them); load the model by its first file",
    )
    p.add_argument(
        "--split-max-tensors", type=int, default=None, metavar="N", help="GGUF: split files of at most N tensors each"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def parse_size(text: str) -> int:
    """A size as gguf-split reads it: a number of bytes, or with K, M or G (powers of 1000)."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "")
    try:
        size = int(float(number) * units.get(unit, 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number, or with K, M or G)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be above 0")
    return size


def _add_output_type(p: argparse.ArgumentParser) -> None:
    from .core.formats import TENSOR_TYPES

    p.add_argument(
        "--output-type",
        default=None,
        choices=list(TENSOR_TYPES),
        metavar="TYPE",
        help="GGUF: the output head's type (BLOOM's tied head is the embedding: over half the bytes read per "
        f"token at q4_k_m); default llama.cpp's choice (q6_k for K-quants). One of: {', '.join(TENSOR_TYPES)}",
    )


def _add_imatrix(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="GGUF, llama.cpp's quantizer types (q2_k ... q6_k, q4_0 ... q5_1): weigh rounding errors by an "
        "importance matrix. FILE is a calibration text (UTF-8, a few thousand tokens or more, like what the model "
        "will read; the matrix is computed with llama.cpp and kept beside the output as <stem>.imatrix.gguf) or "
        "such an imatrix GGUF (also llama-imatrix's)",
    )


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="GGUF file to read")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("-q", "--quant", default="q4_k_m", help="quant type (default q4_k_m)")
    p.add_argument(
        "--force", action="store_true", help="replace the output if it is a file, or a folder PocketLM wrote"
    )
    p.add_argument("--threads", type=int, default=None, help="quantizer threads")
    _add_output_type(p)
    _add_imatrix(p)


def cmd_convert(args: argparse.Namespace) -> int:
    from .api import convert

    summary = convert(
        args.src,
        args.output,
        quant=args.quant,
        format=args.format,
        force=args.force,
        progress=sys.stderr.isatty() and not args.json,
        threads=args.threads,
        output_type=args.output_type,
        imatrix=args.imatrix,
        split_max_size=args.split_max_size,
        split_max_tensors=args.split_max_tensors,
    )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.describe())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .core.checks import check_gguf
    from .core.errors import ModelLoadError
    from .core.formats import gguf_quant_type, tensor_type
    from .core.gguf_split import read_model_header
    from .gguf_target import llama_quantize
    from .imatrix import check_applies, for_quantize, is_gguf, saved_name
    from .output import atomic_output, check_writable

    src = Path(args.input)
    if src.is_dir():
        raise ModelLoadError(f"{src}: a folder; quantize takes a GGUF file")
    if not src.exists():
        raise ModelLoadError(f"{src}: no such file or folder")
    header = read_model_header(src)  # any file of a split model: all its files, checked
    src = header.path  # llama.cpp reads a split model from its first file (and writes one file)
    check_gguf(header, src)  # a clear error for what is not a complete GGUF model, before llama.cpp
    qt = gguf_quant_type(args.quant)
    inputs = (*header.files, args.imatrix)
    out = check_writable(args.output, args.force, inputs)  # before an importance matrix is computed for it
    matrix, source, notes = None, "", []
    if args.imatrix:
        check_applies(qt)
        spec, keep = Path(args.imatrix), saved_name(out)
        computed = not is_gguf(spec)
        matrix, source = for_quantize(spec, src, keep if computed else None, args.threads, sys.stderr.isatty())
        notes.append(
            f"importance matrix of {source}: {len(matrix.sums)} matrices, {matrix.chunks} chunks"
            + (f", saved as {keep}" if computed else "")
        )
    with atomic_output(out, args.force, inputs) as tmp:
        head = tensor_type(args.output_type) if args.output_type else None
        if head is not None:
            notes.append(f"output {args.output_type}")
        llama_quantize(src, tmp, qt.file_type, args.threads, head, matrix, source)
    print(f"wrote {out} ({', '.join([qt.name, *notes])})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pocketlm.converters",
        description=DESCRIPTION,
        epilog=convert_epilog() + "\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    add_convert_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return guarded(cmd_convert, args)
