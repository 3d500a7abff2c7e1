"""`python -m trainers.commands ...`: the `efficientvlm` script without its console entry point."""

import sys

from trainers.commands import console

sys.exit(console())
