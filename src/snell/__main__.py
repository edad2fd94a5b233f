"""`python -m snell` runs the `snell` command."""

import sys

from snell.cli import main

sys.exit(main())
