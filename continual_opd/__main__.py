"""`python -m continual_opd ...` = `continual-opd ...`; the form `accelerate launch -m continual_opd recipe R` uses."""

import sys

from continual_opd.cli import main

sys.exit(main())
