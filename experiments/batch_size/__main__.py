"""``python -m experiments.batch_size {train,sweep} ...`` (run from the repository root; see :mod:`.cli`)."""

import sys

from .cli import main, pin_cpu_kernels

if __name__ == "__main__":
    pin_cpu_kernels()
    sys.exit(main())
