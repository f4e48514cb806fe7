"""``python -m hostagent``: the ``hostagent`` command (``hostagent.cli.main``)."""

import sys

from hostagent.cli import main

if __name__ == "__main__":
    sys.exit(main())
