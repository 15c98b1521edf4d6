"""``python -m sdtree``: the command line (see :mod:`sdtree.cli`)."""

import sys

from sdtree.cli import main

if __name__ == "__main__":
    sys.exit(main())
