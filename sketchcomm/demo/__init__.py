"""The demo behind ``sketchcomm demo``: private, sketched DDP training of an MLP on digits.

* [`sketchcomm.demo.cli`][sketchcomm.demo.cli] — the command, which starts the job under torchrun;
* [`sketchcomm.demo.private_training`][sketchcomm.demo.private_training] — the job (also
  ``examples/train_dp.py``);
* [`sketchcomm.demo.digits`][sketchcomm.demo.digits] — the data (scikit-learn's digits) and the MLP,
  also used by the
  examples.
"""
