"""What every PocketLM command line shares: logging, and the rule that users see one line.

A `PocketLMError` prints `pocketlm: error: <message>` and exits with its code; anything else
is a bug, reported in one line that says `-v` shows the traceback (exit 70).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from .errors import PocketLMError, first_line

EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE
EXIT_STATUS = """exit status: 0 done, 1 error (one line on stderr), 2 bad command line, 70 internal error
(a bug: -v shows the traceback), 130 interrupted."""


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; turn what it raises into one line on stderr and an exit status."""
    verbose = bool(getattr(args, "verbose", False))
    try:
        return command(args)
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in PocketLM: one line, the traceback with -v
        if verbose:
            traceback.print_exc()
        where = "" if verbose else "; run with -v to see the traceback"
        print(
            f"pocketlm: internal error: {type(e).__name__}: {first_line(e)} (a bug in PocketLM{where})", file=sys.stderr
        )
        return EXIT_INTERNAL
