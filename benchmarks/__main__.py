"""``python -m benchmarks BENCHMARK ...`` from the repository's root."""

import sys

from benchmarks.cli import main

sys.exit(main())
