"""The engine options every model-loading subcommand takes (`--device`, `--backend`, `--quant`,
`--threads`, `--ctx`, `--compute-type`) and the load they make."""

from __future__ import annotations

import argparse
from typing import Any


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The "engine" group of options."""
    from pocketlm.backends import backends, devices

    names = ["auto"] + [n for b in backends() for n in (b.name, *b.aliases)]
    listed = ", ".join(f"{b.name} ({'/'.join(b.formats)})" for b in backends())
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", choices=devices(), help="where to run (default: best available)")
    g.add_argument(
        "--backend",
        default=None,
        choices=names,
        metavar="BACKEND",
        help=f"engine: auto (default: chosen for the model and machine), {listed}",
    )
    g.add_argument(
        "--quant",
        dest="load_quant",
        default=None,
        help="for a checkpoint folder: the quant type to convert it to on first use",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    g.add_argument(
        "--ctx", type=int, default=None, metavar="N", help="context length in tokens (default: model's, at most 2048)"
    )
    g.add_argument("--compute-type", default=None, help="CTranslate2 compute type (default: chosen for the machine)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`pocketlm.load`'s keywords from the engine options."""
    return {
        "device": args.device,
        "threads": args.threads,
        "n_ctx": args.ctx,
        "backend": args.backend,
        "quant": args.load_quant,
        "compute_type": args.compute_type,
    }


def load_model(args: argparse.Namespace, parallel: int | str | None = None, **options: Any) -> Any:
    """`pocketlm.load` of `args.model` with the engine options."""
    import pocketlm

    return pocketlm.load(args.model, parallel=parallel, **load_options(args), **options)
