"""Shared fixtures: real multi-process gloo groups (spawned processes, no simulation)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
