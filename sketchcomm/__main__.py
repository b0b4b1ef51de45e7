"""``python -m sketchcomm``: the ``sketchcomm`` command."""

import sys

from sketchcomm.cli import main

sys.exit(main())
