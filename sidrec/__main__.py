"""`python -m sidrec ...`: the same command line as the `sidrec` console script (`sidrec.cli`)."""
import sys

from sidrec.cli import main

sys.exit(main())
