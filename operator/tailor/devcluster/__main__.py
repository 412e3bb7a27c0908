"""``python -m tailor.devcluster``: ``tailor dev cluster`` (``tailor.cli.dev``) under the name
the Makefile uses (``python -m tailor.devcluster build``)."""

import sys

from tailor.cli import main

sys.exit(main(["dev", "cluster", *sys.argv[1:]]))
