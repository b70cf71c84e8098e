"""`python -m convert SRC ...` is `pocketlm convert SRC ...`."""

import sys

from runtime.cli import run

run(["convert", *sys.argv[1:]])
