"""``python -m bitsweep`` runs the command-line tool."""

import sys

from bitsweep.cli import main

sys.exit(main())
