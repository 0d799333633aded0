"""``python -m experiments.batch_size {train,sweep} ...`` (run from the repository root; see :mod:`.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
