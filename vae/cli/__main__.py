"""`python -m vae.cli ...`: the `vae` command."""

import sys

from vae.cli import main

sys.exit(main())
