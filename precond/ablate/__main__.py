"""``python -m precond.ablate``: see ``python -m precond.ablate --help``."""

import sys

from precond.ablate.cli import main

if __name__ == "__main__":
    sys.exit(main())
