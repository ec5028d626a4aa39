import sys

from orchardist.cli import main

sys.exit(main())
