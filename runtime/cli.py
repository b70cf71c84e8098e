"""The `pocketlm` command line: a thin layer over `convert.convert` and `runtime.load`.

Each subcommand imports what it needs when it runs, so `pocketlm --help` is instant.
User errors print one line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from convert.errors import PocketLMError, first_line

EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE
EPILOG = """examples:
  pocketlm convert ./bloomz-560m -o bloomz-560m-q4_k_m.gguf --quant q4_k_m
  pocketlm run bloomz-560m-q4_k_m.gguf "Translate to English: Je t'aime."
  pocketlm info bloomz-560m-q4_k_m.gguf --json

exit status: 0 done, 1 error (one line on stderr), 2 bad command line, 70 internal error
(a bug: -v shows the traceback), 130 interrupted.

network: hub ids use huggingface_hub (HF_HOME, HF_TOKEN, HF_ENDPOINT; HF_HUB_OFFLINE=1 makes
no request). Metadata calls give up after POCKETLM_HUB_TIMEOUT seconds (else
HF_HUB_ETAG_TIMEOUT, else 10) and the cached snapshot is used; a download that receives
nothing for HF_HUB_DOWNLOAD_TIMEOUT seconds (10) is retried, then given up: re-run to resume.
"""


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens covering this mass")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed: makes sampling repeatable")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before TEXT (repeatable)")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "metal", "cuda"], help="where to run (default: best available)")
    g.add_argument("--backend", default=None, choices=["auto", "llama.cpp", "ctranslate2"], help="engine (default: chosen for the model and machine)")
    g.add_argument("--quant", dest="load_quant", default=None, help="for a checkpoint folder: the quant type to convert it to on first use")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    g.add_argument("--ctx", type=int, default=None, metavar="N", help="context length in tokens (default: model's, at most 2048)")
    g.add_argument("--compute-type", default=None, help="CTranslate2 compute type (default: chosen for the machine)")


def _parser_with(*parents: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    class SubParser(argparse.ArgumentParser):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(parents=[*kwargs.pop("parents", []), *parents], **kwargs)

    return SubParser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Convert and run BLOOMZ and T5-family instruction models offline, without PyTorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs (including llama.cpp's)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    # -v also after the subcommand (`pocketlm run -v ...`), where users put it
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_with(verbose))

    p = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint folder",
        description="Convert a Hugging Face checkpoint folder (safetensors or pytorch_model.bin, "
        "single or sharded) into a model PocketLM runs: BLOOM/BLOOMZ become a GGUF file; "
        "T5, Flan-T5, mT5/mT0 and T0 a CTranslate2 model folder.",
        epilog="quant types\n"
        "  GGUF:        f32 f16 bf16 q8_0 (written directly); q4_0 q4_1 q5_0 q5_1 q2_k q3_k_s\n"
        "               q3_k_m q3_k_l q4_k_s q4_k_m (default) q5_k_s q5_k_m q6_k (llama.cpp's\n"
        "               quantizer). Tensors whose rows do not fit a type's block keep a wider\n"
        "               type; the summary lists them.\n"
        "  CTranslate2: int8 (default) int8_float32 int8_float16 int8_bfloat16 int16 float16\n"
        "               bfloat16 float32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint folder (with config.json)")
    p.add_argument("-o", "--output", help="output file or folder (default: ./<folder>-<quant>.gguf or ./<folder>-ct2-<quant>)")
    p.add_argument("-q", "--quant", default=None, help="quant type (default: q4_k_m for GGUF, int8 for CTranslate2)")
    p.add_argument("--format", default=None, choices=["gguf", "ct2"], help="output format (default: GGUF for BLOOM, ct2 for the T5 family)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser(
        "quantize", help="re-quantize a GGUF file with llama.cpp",
        description="Quantize an f32/f16/bf16 GGUF file to another type with llama.cpp's quantizer.",
    )
    p.add_argument("input", help="GGUF file to read")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("-q", "--quant", default="q4_k_m", help="quant type (default q4_k_m)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads")

    p = sub.add_parser(
        "run", help="generate text from a prompt",
        description="Complete a prompt with a converted model, streaming the answer.",
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder (converted once, cached)")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' or omitted reads stdin")
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--input", default=None, metavar="JSONL", help='answer every prompt of a JSONL file (lines: {"id": .., "prompt": ..} or "text")')
    p.add_argument("--output", default=None, metavar="JSONL", help="where --input answers go; re-running skips prompts already answered")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together with --input (CTranslate2)")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true", help="print the result (text, ids, finish reason, speed) as JSON")
    _add_generation_options(p)
    _add_load_options(p)

    p = sub.add_parser(
        "info", help="show what a model file holds and how it would run",
        description="Show a model's architecture, quantization, provenance (source repo, "
        "converter, sha256 of source files) and the backend/device PocketLM would choose.",
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder")
    p.add_argument("--json", action="store_true", help="print as JSON")
    _add_load_options(p)

    p = sub.add_parser(
        "pull", help="download a model from the Hugging Face Hub",
        description="Download what PocketLM needs of a Hub repo into the Hugging Face cache: config, "
        "tokenizer and one storage format's weights (safetensors preferred), or one GGUF file of a "
        "GGUF repo. Honours HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.",
    )
    p.add_argument("repo", help="org/name, optionally @revision (branch, tag or commit)")
    p.add_argument("--quant", default=None, help="for GGUF repos: the quant type's file (default: q4_k_m if offered)")
    p.add_argument("--convert", action="store_true", help="also convert it now (otherwise on first use)")

    p = sub.add_parser("list", help="list converted models in the cache",
                       description="List the conversions in PocketLM's cache, with source, quant and size.")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("rm", help="remove converted models from the cache",
                       description="Remove cached conversions by key (or key prefix, see `pocketlm list`) or source repo id.")
    p.add_argument("selector", nargs="+", help="key, key prefix, or org/name")

    p = sub.add_parser(
        "doctor", help="check this machine and its engines",
        description="Show the machine, the installed engines and their GPU support, what PocketLM would "
        "choose for each kind of model, and what to install for a better choice.",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve one model at /v1/completions, /v1/chat/completions and /v1/models "
        "(OpenAI-compatible, with streaming), plus /health. Binds to localhost unless --host says otherwise.",
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (env POCKETLM_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask (default 2048)")
    _add_load_options(p)
    return parser


def cmd_convert(args: argparse.Namespace) -> int:
    from convert import convert

    summary = convert(
        args.src, args.output, quant=args.quant, format=args.format, force=args.force,
        progress=sys.stderr.isatty() and not args.json, threads=args.threads,
    )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.describe())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from convert.gguf_target import llama_quantize, quant_type
    from convert.output import atomic_output

    from .loader import detect_format

    detect_format(Path(args.input))
    qt = quant_type(args.quant)
    with atomic_output(Path(args.output), args.force) as tmp:
        llama_quantize(Path(args.input), tmp, qt.file_type, args.threads)
    print(f"wrote {args.output} ({qt.name})")
    return 0


def _prompt(args: argparse.Namespace) -> str | list[int]:
    if args.ids is not None:
        try:
            return [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise PocketLMError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def _load(args: argparse.Namespace) -> Any:
    import runtime

    return runtime.load(
        args.model, device=args.device, threads=args.threads, n_ctx=args.ctx, backend=args.backend,
        quant=args.load_quant, compute_type=args.compute_type,
    )


def cmd_run(args: argparse.Namespace) -> int:
    gen = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )
    if args.input or args.output:
        if not (args.input and args.output):
            raise PocketLMError("--input and --output go together")
        from .batch import run_jsonl

        with _load(args) as model:
            stats = run_jsonl(model, Path(args.input), Path(args.output), args.batch_size, sys.stderr.isatty(), **gen)
        print(f"answered {stats.answered} prompts ({stats.skipped} already answered) -> {stats.output}")
        return 0
    prompt = _prompt(args)
    with _load(args) as model:
        if args.json or args.no_stream:
            result = model.generate(prompt, **gen)
            if args.json:
                out = {
                    "text": result.text, "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                    "seconds": round(result.seconds, 4), "tokens_per_second": round(result.tokens_per_second, 2),
                }
                print(json.dumps(out, ensure_ascii=False))
            else:
                print(result.text)
            return 0
        for piece in model.stream(prompt, **gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .report import describe, model_report

    report = model_report(args.model, device=args.device, threads=args.threads, backend=args.backend)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else describe(report))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import parse_ref, pull

    ref = parse_ref(args.repo)
    if ref is None:
        raise PocketLMError(f"{args.repo!r} is not a Hub id (org/name[@revision])")
    path = pull(ref, quant=args.quant, progress=sys.stderr.isatty())
    print(path)
    if args.convert and path.is_dir():
        from .cache import converted
        from .loader import inspect_model
        from .platform import choose, detect_facts

        choice = choose(inspect_model(path, args.quant), detect_facts())
        print(converted(path, choice.format, choice.quant or "", progress=sys.stderr.isatty()))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .cache import cache_root, entries

    rows = [{"key": e.key, "source": e.source, "format": e.manifest.get("format"), "quant": e.manifest.get("quant"),
             "size_bytes": e.size_bytes, "created": e.manifest.get("created"), "path": str(e.path)} for e in entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no converted models in {cache_root()}")
    for r in rows:
        print(f"{r['key'][:12]}  {r['format']:<4} {r['quant']:<8} {r['size_bytes'] / 2**20:>9.1f} MiB  {r['source']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .cache import remove

    removed = [e for selector in args.selector for e in remove(selector)]
    if not removed:
        raise PocketLMError(f"nothing in the cache matches {' '.join(args.selector)} (see pocketlm list)")
    for e in removed:
        print(f"removed {e.key[:12]} ({e.source}, {e.manifest.get('quant')})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import describe, doctor_report

    report = doctor_report()
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .server import check_address, serve

    if args.max_queue < 0:
        raise PocketLMError(f"--max-queue {args.max_queue}: must be 0 or more")
    check_address(args.host, args.port)  # now, not after loading the model (that can take minutes)
    logging.getLogger("pocketlm.server").setLevel(logging.INFO)  # one line per request
    with _load(args) as model:
        serve(
            model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("POCKETLM_API_KEY"),
            max_queue=args.max_queue, max_tokens_limit=args.max_tokens, model_name=args.model,
        )
    return 0


COMMANDS = {
    "convert": cmd_convert, "quantize": cmd_quantize, "run": cmd_run, "info": cmd_info,
    "doctor": cmd_doctor, "serve": cmd_serve, "pull": cmd_pull, "list": cmd_list, "rm": cmd_rm,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.version:
        from convert import __version__

        print(f"pocketlm {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in PocketLM: one line, the traceback with -v
        if args.verbose:
            traceback.print_exc()
        where = "" if args.verbose else "; run with -v to see the traceback"
        print(f"pocketlm: internal error: {type(e).__name__}: {first_line(e)} (a bug in PocketLM{where})", file=sys.stderr)
        return EXIT_INTERNAL


def run(argv: Any = None) -> None:
    sys.exit(main(argv))
