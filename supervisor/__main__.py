"""``python -m supervisor``: the supervisor daemon, as ``haul supervisor``."""

import sys

from supervisor.cli import main

sys.exit(main(["supervisor", *sys.argv[1:]]))
