"""sketchcomm: Count Sketch gradient communication for PyTorch DDP, with differential privacy.

``SketchState`` + ``sketch_hook`` replace DDP's gradient allreduce with an allreduce of Count Sketch
tables; :mod:`sketchcomm.privacy` adds clipping and Gaussian noise in sketch space with an epsilon
ledger on Opacus accountants.
"""

from sketchcomm.hooks import SketchState, sketch_hook
from sketchcomm.sketch import CountSketch
from sketchcomm.stats import SketchStats

__all__ = ["CountSketch", "SketchState", "SketchStats", "sketch_hook"]
__version__ = "0.1.0"
