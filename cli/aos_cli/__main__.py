"""`python -m aos_cli` is the `aos` command."""

import sys

from aos_cli.main import main

sys.exit(main())
