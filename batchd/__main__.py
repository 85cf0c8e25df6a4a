"""`python -m batchd` is the `batchd` command."""

import sys

from .cli import main

sys.exit(main())
