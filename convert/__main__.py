"""`python -m pocketlm.converters SRC ...`: the converter alone (the runtime is not imported)."""

import sys

from .cli import main

sys.exit(main())
