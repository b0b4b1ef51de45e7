"""Private, sketched DDP training on real data, with a ledger, checkpoints and wandb reports.

    torchrun --standalone --nproc_per_node=2 examples/train_dp.py --target-epsilon 4 --steps 150

Every option is listed by ``--help``. The loop itself lives in
:mod:`sketchcomm.demo.private_training` so that ``sketchcomm demo`` runs exactly the same job;
read it there to adapt it to your model.
The three lines that make a DDP model private and sketched are::

    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, budget=4.0, path="run/ledger.json",
                           writer=rank == 0, dataset_size=n)
    state = DPSketchState(ledger, max_grad_norm=1.0, unit="example", sample_rate=q,
                          dataset_size=n, target_epsilon=4.0, steps=150, compression=20)
    state.register(ddp_model)
"""

import sys

from sketchcomm.demo.private_training import main

if __name__ == "__main__":
    sys.exit(main())
