"""``python -m orchardist``: the same command line as the ``orchardist`` script."""

import sys

from orchardist.cli import main

sys.exit(main())
