"""The `pocketlm` command line: a thin layer over `pocketlm.converters.cli` and `pocketlm.load`.

Only the subcommand being run gets its options built (their choices come from the backend
and architecture registries) and each imports what it needs when it runs, so `pocketlm
--help` is instant. User errors print one line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pocketlm.cli.engine_options import add_load_options, load_model, load_options
from pocketlm.cli.evaluate import build as _eval
from pocketlm.cli.evaluate import cmd_eval  # noqa: F401 (COMMANDS finds it by name)
from pocketlm.converters.core.cli import EXIT_INTERNAL, EXIT_STATUS, guarded, setup_logging
from pocketlm.converters.core.errors import PocketLMError

__all__ = ["main", "run", "build_parser", "EXIT_INTERNAL"]
EPILOG = f"""examples:
  pocketlm convert ./bloomz-560m -o bloomz-560m-q4_k_m.gguf --quant q4_k_m
  pocketlm run bloomz-560m-q4_k_m.gguf "Translate to English: Je t'aime."
  pocketlm info bloomz-560m-q4_k_m.gguf --json

{EXIT_STATUS}

network: hub ids use huggingface_hub (HF_HOME, HF_TOKEN, HF_ENDPOINT; HF_HUB_OFFLINE=1 makes
no request). Metadata calls give up after POCKETLM_HUB_TIMEOUT seconds (else
HF_HUB_ETAG_TIMEOUT, else 10) and the cached snapshot is used; a download that receives
nothing for HF_HUB_DOWNLOAD_TIMEOUT seconds (10) is retried, then given up: re-run to resume.
"""


def _generation_flags() -> list[tuple[Any, Any]]:
    """GenerationOptions' fields that are `run` flags (their metadata says how), with their types."""
    import dataclasses
    import typing

    from pocketlm.core.generation import GenerationOptions

    hints = typing.get_type_hints(GenerationOptions)
    return [(f, hints[f.name]) for f in dataclasses.fields(GenerationOptions) if f.metadata.get("flags", True)]


def _choice(value: Any) -> str:
    return str(value).lower()  # False -> "false", "never" -> "never"


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """Generation flags, made from GenerationOptions' fields; those not given take the model's
    defaults (its generation_config.json, shown by `pocketlm info`), else PocketLM's (shown here)."""
    import typing

    g = p.add_argument_group("generation (unset: the model's generation_config.json, else these defaults)")
    for f, hint in _generation_flags():
        meta = f.metadata
        how: dict[str, Any] = {"dest": f.name, "help": meta["help"].format(default=f.default)}
        if "metavar" in meta:
            how["metavar"] = meta["metavar"]
        if "choices" in meta:
            how["choices"] = [_choice(c) for c in meta["choices"]]
        elif typing.get_origin(hint) is tuple:
            how["action"] = "append"  # repeatable
        else:  # int, float, or one of them or None
            how["type"] = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        g.add_argument(*meta.get("flags", ["--" + f.name.replace("_", "-")]), **how)


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options given on the command line (checked now, before loading)."""
    import typing

    from pocketlm.core.generation import GenerationOptions

    given = {}
    for f, hint in _generation_flags():
        value = getattr(args, f.name)
        if value is None:
            continue
        if "choices" in f.metadata:
            value = {_choice(c): c for c in f.metadata["choices"]}[value]
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        given[f.name] = value
    GenerationOptions(**given)
    return given


def _parser_with(*parents: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    class SubParser(argparse.ArgumentParser):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(parents=[*kwargs.pop("parents", []), *parents], **kwargs)

    return SubParser


def _convert(p: argparse.ArgumentParser) -> None:
    from pocketlm.converters.cli import DESCRIPTION, add_convert_arguments, convert_epilog

    p.description, p.epilog = DESCRIPTION, convert_epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_convert_arguments(p)


def _quantize(p: argparse.ArgumentParser) -> None:
    from pocketlm.converters.cli import add_quantize_arguments

    p.description = "Quantize an f32/f16/bf16 GGUF file to another type with llama.cpp's quantizer."
    add_quantize_arguments(p)


def _run(p: argparse.ArgumentParser) -> None:
    p.description = "Complete a prompt with a converted model, streaming the answer."
    p.add_argument(
        "model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder (converted once, cached)"
    )
    p.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' or omitted reads stdin")
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument(
        "--input",
        default=None,
        metavar="JSONL",
        help='answer every prompt of a JSONL file (lines: {"id": .., "prompt": ..} or "text")',
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="JSONL",
        help="where --input answers go; re-running skips prompts already answered",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together with --input (default 16)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="spread --input over a Ray cluster: ADDRESS (ray://host:10001, host:6379, or auto for the one this "
        "machine joined), or a local Ray instance on this machine when omitted; needs pocketlm[ray]",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: model copies answering at once (default: one per node), each reserving --threads CPUs "
        "(default: its share of the cluster's CPUs, at most one node's)",
    )
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true", help="print the result (text, ids, finish reason, speed) as JSON")
    _add_generation_options(p)
    add_load_options(p)


def _info(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Show a model's architecture, quantization, provenance (source repo, converter, sha256 of "
        "source files) and the backend/device PocketLM would choose."
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder")
    p.add_argument("--json", action="store_true", help="print as JSON")
    add_load_options(p)


def _pull(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Download what PocketLM needs of a Hub repo into the Hugging Face cache: config, tokenizer and "
        "one storage format's weights (safetensors preferred), or one GGUF file of a GGUF repo. "
        "Honours HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE."
    )
    p.add_argument("repo", help="org/name, optionally @revision (branch, tag or commit)")
    p.add_argument("--quant", default=None, help="for GGUF repos: the quant type's file (default: q4_k_m if offered)")
    p.add_argument("--convert", action="store_true", help="also convert it now (otherwise on first use)")


def _list(p: argparse.ArgumentParser) -> None:
    p.description = "List the conversions in PocketLM's cache, with source, quant and size."
    p.add_argument("--json", action="store_true", help="print as JSON")


def _rm(p: argparse.ArgumentParser) -> None:
    p.description = "Remove cached conversions by key (or key prefix, see `pocketlm list`) or source repo id."
    p.add_argument("selector", nargs="+", help="key, key prefix (4 characters or more), or org/name")


def _doctor(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Show the machine, the installed engines and their GPU support, the backends, what PocketLM "
        "would choose for each kind of model, and what to install for a better choice."
    )
    p.add_argument("--json", action="store_true", help="print as JSON")


def _embed(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Embed texts: one L2-normalised vector per input, the mean of the model's final hidden states over "
        "its tokens (BLOOM: the last layer after its final norm; T5 family: the encoder's output). Texts are "
        "tokenized as prompts are (T5 appends </s>). Computed by llama.cpp: a checkpoint folder is converted to "
        "GGUF (once, cached); a CTranslate2 folder is refused (CTranslate2 exposes no encoder output)."
    )
    p.epilog = """examples:
  pocketlm embed bloomz-560m-q4_k_m.gguf "first text" "second text"
  pocketlm embed flan-t5-small-f16.gguf --json < lines.txt > vectors.jsonl
  pocketlm embed model.gguf --ids 5,17,42 --ids 8,9 --json"""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "model", help="GGUF file, or Hugging Face checkpoint folder (converted to GGUF once, cached; --quant chooses)"
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed; none: each non-empty line of stdin is one")
    p.add_argument(
        "--ids",
        action="append",
        default=None,
        metavar="IDS",
        help="comma-separated token ids as one input (repeatable)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON line per input, {"index": i, "embedding": [...]}, in input order',
    )
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="inputs embedded together (default 64)")
    add_load_options(p)


def _serve(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from pocketlm.serving.app import ENDPOINTS, Timeouts
    from pocketlm.serving.http import default_max_connections
    from pocketlm.serving.openai_api import Limits

    routes = ", ".join(f"{'/'.join(methods)} {path}" for path, methods in ENDPOINTS.items())
    p.description = (
        f'Serve one model over an OpenAI-compatible HTTP API (streaming with "stream": true): {routes}. '
        "Binds to localhost unless --host says otherwise. SIGTERM or Ctrl-C stop it: running "
        'generations may finish within --drain-timeout, then streams end with finish_reason "abort" '
        "and [DONE]; a second signal cuts at once."
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (env POCKETLM_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 429 (default 64)")
    p.add_argument(
        "--parallel",
        default="auto",
        metavar="N",
        help="requests decoded together (default auto: chosen for the model and machine, shown at start)",
    )
    p.add_argument(
        "--kv-cells",
        type=int,
        default=None,
        metavar="N",
        help="tokens the KV cache holds for all requests together (default: parallel x context, "
        "at most 16384); a request waits until its prompt and max_tokens fit",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000; repeatable) call the server",
    )
    limits = p.add_argument_group("what one request may ask (beyond a limit: 400 naming it)")
    for f in dataclasses.fields(Limits):
        default = "the model's context" if f.default is None else f.default
        limits.add_argument(
            Limits.flag(f.name),
            type=int,
            default=f.default,
            metavar="N",
            help=f"{f.metadata['help']} (default {default})",
        )
    conns = p.add_argument_group("connections")
    conns.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="open connections at once; at the cap a new one replaces the longest idle, or gets 503 "
        f"(default: what the open-file limit leaves, here {default_max_connections()})",
    )
    for f in dataclasses.fields(Timeouts):
        conns.add_argument(
            f"--{f.name.replace('_', '-')}-timeout",
            dest=f"{f.name}_timeout",
            type=float,
            default=f.default,
            metavar="S",
            help=f"seconds {f.metadata['help']} (default {f.default:g})",
        )
    add_load_options(p)


# name -> (one-line help, what builds its options, the function that runs it)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "convert": ("convert a Hugging Face checkpoint folder", _convert, "cmd_convert"),
    "quantize": ("re-quantize a GGUF file with llama.cpp", _quantize, "cmd_quantize"),
    "run": ("generate text from a prompt", _run, "cmd_run"),
    "info": ("show what a model file holds and how it would run", _info, "cmd_info"),
    "pull": ("download a model from the Hugging Face Hub", _pull, "cmd_pull"),
    "list": ("list converted models in the cache", _list, "cmd_list"),
    "rm": ("remove converted models from the cache", _rm, "cmd_rm"),
    "doctor": ("check this machine and its engines", _doctor, "cmd_doctor"),
    "serve": ("serve a model over an OpenAI-compatible HTTP API", _serve, "cmd_serve"),
    "eval": ("score a model on lm-evaluation-harness tasks, in process", _eval, "cmd_eval"),
    "embed": ("embed texts as vectors (mean of the final hidden states)", _embed, "cmd_embed"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only` (a subcommand, or "" for none), the other subcommands are listed
    but their options not built."""
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
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show debug logs and tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_with(verbose))
    for name, (summary, build, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if only is None or only == name:
            build(p)
    return parser


def _prompt(args: argparse.Namespace) -> str | list[int]:
    if args.ids is not None:
        try:
            return [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise PocketLMError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def _parallel(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise PocketLMError(f"--parallel {value}: a number of requests (1 or more) or auto")
    return int(value)


def cmd_run(args: argparse.Namespace) -> int:
    given = _given_options(args)
    if args.input or args.output:
        if not (args.input and args.output):
            raise PocketLMError("--input and --output go together")
        if args.ray is not None:
            return _run_on_ray(args, given)
        if args.actors is not None:
            raise PocketLMError("--actors goes with --ray")
        from pocketlm.cli.batch import run_jsonl

        with load_model(args, parallel=args.batch_size if args.batch_size > 1 else None) as model:
            gen = model.options(**given)
            stats = run_jsonl(model, Path(args.input), Path(args.output), args.batch_size, sys.stderr.isatty(), gen)
        print(f"answered {stats.answered} prompts ({stats.skipped} already answered) -> {stats.output}")
        return 0
    prompt = _prompt(args)
    with load_model(args) as model:
        gen = model.options(**given)
        several = gen.sequences > 1
        if args.json or args.no_stream or several or gen.logprobs is not None:
            result = model.generate(prompt, gen)
            if args.json:
                out = _result_json(model, result)
                if several:
                    out["sequences"] = [_result_json(model, r) for r in result.sequences]
                print(json.dumps(out, ensure_ascii=False))
                return 0
            for r in result.sequences:
                if several:
                    score = f", score {r.score:.4f}" if r.score is not None else ""
                    print(f"--- {r.index + 1} of {len(result.sequences)} ({r.finish_reason}{score})")
                print(r.text)
                if r.logprobs is not None:
                    _print_logprobs(model, r)
            return 0
        for piece in model.stream(prompt, gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _run_on_ray(args: argparse.Namespace, given: dict[str, Any]) -> int:
    try:
        from pocketlm.serving.ray_cluster import run_jsonl_on_ray
    except ModuleNotFoundError as e:
        raise PocketLMError(f"--ray needs Ray ({e.name} is missing): pip install 'pocketlm[ray]'") from None
    load = {k: v for k, v in load_options(args).items() if v is not None and v != "auto"}
    address = None if args.ray == "local" else args.ray
    stats = run_jsonl_on_ray(
        args.model,
        Path(args.input),
        Path(args.output),
        address,
        args.actors,
        args.batch_size,
        given,
        load,
        sys.stderr.isatty(),
    )
    print(f"answered {stats.answered} prompts ({stats.skipped} already answered) -> {stats.output}")
    return 0


def _result_json(model: Any, result: Any) -> dict[str, Any]:
    seconds, speed = round(result.seconds, 4), round(result.tokens_per_second, 2)
    return result.render(model.token_bytes, seconds=seconds, tokens_per_second=speed)


def _print_logprobs(model: Any, result: Any) -> None:
    for shown in (lp.render(model.token_bytes) for lp in result.logprobs):
        alternatives = "  ".join(f"{a['token']!r} {a['logprob']:.3f}" for a in shown["top"])
        print(f"  {shown['token']!r:>16} {shown['logprob']:8.4f}   {alternatives}")


def cmd_info(args: argparse.Namespace) -> int:
    from pocketlm.cli.report import describe, model_report

    report = model_report(args.model, device=args.device, threads=args.threads, backend=args.backend)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else describe(report))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from pocketlm.loading.hub import parse_ref, pull

    ref = parse_ref(args.repo)
    if ref is None:
        raise PocketLMError(f"{args.repo!r} is not a Hub id (org/name[@revision])")
    path = pull(ref, quant=args.quant, progress=sys.stderr.isatty())
    print(path)
    if args.convert and path.is_dir():
        from pocketlm.loading.cache import converted
        from pocketlm.loading.load import decide
        from pocketlm.loading.source import inspect

        choice = decide(inspect(path, args.quant))
        print(converted(path, choice.format, choice.quant or "", progress=sys.stderr.isatty()))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pocketlm.loading.cache import cache_root, entries

    rows = [
        {
            "key": e.key,
            "source": e.source,
            "format": e.manifest.get("format"),
            "quant": e.manifest.get("quant"),
            "size_bytes": e.size_bytes,
            "created": e.manifest.get("created"),
            "path": str(e.path),
            "broken": e.broken,
        }
        for e in entries()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no converted models in {cache_root()}")
    for r in rows:
        if r["broken"]:
            print(f"{r['key'][:12]}  broken: {r['broken']} (pocketlm rm {r['key'][:12]} removes it)")
            continue
        fmt, quant = r["format"] or "?", r["quant"] or "?"
        print(f"{r['key'][:12]}  {fmt:<4} {quant:<8} {r['size_bytes'] / 2**20:>9.1f} MiB  {r['source']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from pocketlm.loading.cache import remove

    removed = [e for selector in args.selector for e in remove(selector)]
    if not removed:
        raise PocketLMError(f"nothing in the cache matches {' '.join(args.selector)} (see pocketlm list)")
    for e in removed:
        what = "broken" if e.broken else f"{e.source}, {e.manifest.get('quant')}"
        print(f"removed {e.key[:12]} ({what})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pocketlm.cli.doctor import describe, doctor_report

    report = doctor_report()
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from pocketlm.serving.app import Timeouts
    from pocketlm.serving.http import check_address, serve
    from pocketlm.serving.openai_api import Limits

    if args.max_queue < 0:
        raise PocketLMError(f"--max-queue {args.max_queue}: must be 0 or more")
    parallel = _parallel(args.parallel)
    if args.kv_cells is not None and args.kv_cells < 1:
        raise PocketLMError(f"--kv-cells {args.kv_cells}: must be 1 or more")
    if args.max_connections is not None and args.max_connections < 1:
        raise PocketLMError(f"--max-connections {args.max_connections}: must be 1 or more")
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    timeouts = Timeouts(**{f.name: getattr(args, f"{f.name}_timeout") for f in dataclasses.fields(Timeouts)})
    check_address(args.host, args.port)  # now, not after loading the model (that can take minutes)
    logging.getLogger("pocketlm.server").setLevel(logging.INFO)  # one line per request
    options = {"kv_cells": args.kv_cells} if args.kv_cells is not None else {}
    with load_model(args, parallel=parallel, **options) as model:
        serve(
            model,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("POCKETLM_API_KEY"),
            max_queue=args.max_queue,
            model_name=args.model,
            cors_origins=args.cors_origin,
            limits=limits,
            timeouts=timeouts,
            max_connections=args.max_connections,
        )
    return 0


def _embedding_inputs(args: argparse.Namespace) -> Iterator[str | list[int]]:
    for given in args.ids or ():
        try:
            yield [int(t) for t in given.replace(" ", "").split(",") if t]
        except ValueError:
            raise PocketLMError(f"--ids must be comma-separated integers, got {given!r}") from None
    yield from args.texts
    if not args.texts and not args.ids:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\r\n")


def cmd_embed(args: argparse.Namespace) -> int:
    import itertools
    import re

    from pocketlm.converters.core.ct2_file import is_ct2_folder
    from pocketlm.converters.core.errors import RequestError

    if args.batch_size < 1:
        raise PocketLMError(f"--batch-size {args.batch_size}: must be 1 or more")
    inputs = _embedding_inputs(args)
    first = next(inputs, None)  # before loading: a wrong --ids or no input says so at once
    if first is None:
        raise PocketLMError("nothing to embed: give texts, --ids, or lines on stdin")
    inputs = itertools.chain([first], inputs)
    if args.backend is None and not is_ct2_folder(Path(args.model)):
        args.backend = "llama.cpp"  # the engine that embeds: a checkpoint folder is converted to GGUF for it
    index = tokens = 0
    with load_model(args) as model:
        while batch := list(itertools.islice(inputs, args.batch_size)):
            try:
                result = model.embed(batch)
            except RequestError as e:  # its input index counts from this batch's first
                raise RequestError(
                    re.sub(r"^input (\d+)", lambda m, offset=index: f"input {int(m[1]) + offset}", str(e))
                ) from None
            tokens += result.tokens
            for item, vector in zip(batch, result.vectors):
                if args.json:
                    print(json.dumps({"index": index, "embedding": vector.tolist()}))
                else:
                    shown = ", ".join(f"{v:+.4f}" for v in vector[:4])
                    what = repr(item[:40] + ("..." if len(item) > 40 else "")) if isinstance(item, str) else "ids"
                    print(
                        f"{index}: dim {vector.size}, norm {float((vector**2).sum() ** 0.5):.4f}, [{shown}, ...] {what}"
                    )
                index += 1
            sys.stdout.flush()
        if not args.json:
            print(f"{index} inputs, {tokens} tokens ({model.info.backend}, {model.info.quant})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pocketlm.converters.cli import cmd_convert

    return cmd_convert(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from pocketlm.converters.cli import cmd_quantize

    return cmd_quantize(args)


COMMANDS = {name: globals()[runner] for name, (_, _, runner) in SUBCOMMANDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.version:
        from pocketlm.converters.core import __version__

        print(f"pocketlm {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    return guarded(COMMANDS[args.command], args)


def run(argv: Any = None) -> None:
    sys.exit(main(argv))
