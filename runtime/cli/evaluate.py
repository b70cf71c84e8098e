"""`pocketlm eval MODEL --tasks t1,t2`: lm-evaluation-harness tasks on a model, in process.

The model runs through pocketlm.evaluation's lm-eval model class (the `eval` extra); the tasks
are lm-eval's own, or YAML tasks of your own with --include-path. Prints lm-eval's table, or
the results as JSON; --output-path also keeps every request's answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.converters.core.errors import PocketLMError, writing

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

INSTALL = "pip install 'pocketlm[eval]'"


def build(p: argparse.ArgumentParser) -> None:
    """The options of `pocketlm eval`."""
    from pocketlm.cli.engine_options import add_load_options

    p.description = (
        "Run lm-evaluation-harness tasks (multiple choice, perplexity, generation) on a model in this "
        f"process: the same scores lm-eval's own models give, on llama.cpp or CTranslate2. Needs {INSTALL}."
    )
    p.add_argument("model", help="GGUF file, CTranslate2 folder, or Hugging Face checkpoint folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or glob patterns)")
    p.add_argument("--limit", type=float, default=None, metavar="N", help="at most N items per task (below 1: a share)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="examples put before each question")
    p.add_argument(
        "--batch-size", type=int, default=1, metavar="B", help="generation prompts decoded together (default 1)"
    )
    p.add_argument("--output-path", default=None, metavar="P", help="write the results and every request's answer to P")
    p.add_argument("--include-path", default=None, metavar="DIR", help="also find tasks in the YAML files under DIR")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_load_options(p)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate; 2 when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"pocketlm: error: pocketlm eval needs lm-evaluation-harness: {INSTALL}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        raise PocketLMError(f"--batch-size {args.batch_size}: must be 1 or more")
    if args.limit is not None and args.limit <= 0:
        raise PocketLMError(f"--limit {args.limit:g}: must be above 0")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise PocketLMError(f"--num-fewshot {args.num_fewshot}: must be 0 or more")
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from pocketlm.cli.engine_options import load_model
    from pocketlm.evaluation import PocketLM

    tasks, manager = _tasks(args.tasks, args.include_path)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    with load_model(args, parallel=args.batch_size if args.batch_size > 1 else None) as model:
        results = lm_eval.simple_evaluate(
            model=PocketLM(model, batch_size=args.batch_size),
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=args.output_path is not None,
        )
    results["config"]["model"] = "pocketlm"
    results["config"]["model_args"] = args.model
    if args.output_path is not None:
        out = Path(args.output_path)
        with writing(out):
            out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    if args.json:
        shown = {k: v for k, v in results.items() if k != "samples"}
        print(json.dumps(shown, default=handle_non_serializable, ensure_ascii=False))
    else:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    return 0


def _tasks(spec: str, include_path: str | None) -> tuple[list[str], TaskManager]:
    """The task names asked for, each known to lm-eval (with --include-path's tasks), and the
    manager that found them."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise PocketLMError(f"--include-path {include_path}: not a folder")
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise PocketLMError("--tasks: no task named")
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise PocketLMError(
            f"unknown task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            "(`lm_eval ls tasks` lists lm-eval's; --include-path DIR adds YAML tasks of your own)"
        )
    return names, manager
