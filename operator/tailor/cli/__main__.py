"""``python -m tailor.cli``: the ``tailor`` command, for a checkout without the console script."""

import sys

from tailor.cli import main

sys.exit(main())
