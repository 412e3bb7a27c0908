"""``python -m tailor.devcluster``: the dev cluster command line (see ``cli``)."""

import sys

from tailor.devcluster.cli import main

sys.exit(main(sys.argv[1:]))
