"""`python -m cluster.cli ...` is `jamba ...` (where the console script is not on the PATH)."""

import sys

from cluster.cli.main import main

sys.exit(main())
