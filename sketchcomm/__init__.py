"""sketchcomm: Count Sketch gradient communication for PyTorch DDP, with differential privacy.

``SketchState`` + ``sketch_hook`` replace DDP's gradient allreduce with an allreduce of Count Sketch
tables; [`sketchcomm.privacy`][sketchcomm.privacy] adds clipping and Gaussian noise in sketch space
with an epsilon ledger on Opacus accountants; [`sketchcomm.engine`][sketchcomm.engine] is the
toolkit every hook is built on.

>>> import torch
>>> from sketchcomm import CountSketch
>>> sketch = CountSketch(dim=6, rows=1, columns=7)
>>> sketch.estimate(sketch.sketch(torch.arange(1.0, 7.0))).tolist()  # exact: c >= d
[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
"""

from sketchcomm.config import SketchConfig
from sketchcomm.hooks import SketchState, sketch_hook
from sketchcomm.sketch import CountSketch

__all__ = ["CountSketch", "SketchConfig", "SketchState", "sketch_hook"]
__version__ = "0.1.0"
