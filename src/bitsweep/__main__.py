"""``python -m bitsweep`` runs the command-line tool."""

import sys

from bitsweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
