"""`python -m rlx.cli ...`: the `rlx` command without its installed script (tests, Slurm jobs)."""

import sys

from rlx.cli import main

sys.exit(main())
