"""`python -m sidrec.service ...`: the service's own commands (`serve`, `index`), as `sidrec serve`."""
import sys

from sidrec.service.cli import main

sys.exit(main())
