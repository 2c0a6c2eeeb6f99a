"""``python -m latentdiff.cli``: the ``latentdiff`` command."""

import sys

from latentdiff.cli import main

sys.exit(main())
