"""`python -m service ...`: the service's command line (see `service.cli`)."""
import sys

from service.cli import main

sys.exit(main())
