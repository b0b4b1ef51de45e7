"""Run the Triton kernels of ``sketchcomm.sketch_triton`` on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported, and a
pytest process may already have imported it, so the kernels run in a fresh interpreter:
``run_interpreted(cases)`` starts ``python tests/triton_interpreted.py CASES OUT`` with the
variable set and returns what the kernels produced for every case. ``case_inputs(case)`` makes the
same inputs in the calling process, where the references are computed with the CPU paths of
``CountSketch``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sketchcomm.sketch import CountSketch

REPOSITORY = Path(__file__).resolve().parent.parent


def case_inputs(
    case: dict[str, Any],
) -> tuple[CountSketch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sketch, x [batch, d], tables [batch, r, c] to add to, table [r, c] to estimate from)``.

    ``x`` is Gaussian with ``case["spikes"]`` planted large coordinates; the kind ``"sampled"``
    plants them at the heavy-hitter threshold's sample positions (so that the sample overrates how
    many coordinates reach the threshold), ``"zeros"`` makes ``x`` zero, ``"nan"`` puts a NaN in
    the estimated table, ``"integers"`` rounds ``x`` (ties among the rows' estimates).
    """
    d, rows, columns = case["dim"], case["rows"], case["columns"]
    sketch = CountSketch(d, rows, columns, seed=case["seed"])
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], d, generator=generator)
    kind = case.get("kind", "gaussian")
    if kind == "zeros":
        x.zero_()
    elif kind == "integers":
        x.round_()
    elif kind == "sampled":
        x[:, :: d // case["sample_size"]] += 50.0
    else:
        spikes = torch.randperm(d, generator=generator)[: case.get("spikes", 0)]
        x[:, spikes] += 20.0 * torch.sign(torch.randn(len(spikes), generator=generator))
    tables = torch.randn(case["batch"], rows, columns, generator=generator)
    table = sketch.sketch(x[0])
    if kind == "nan":
        table[0, 3] = float("nan")
    return sketch, x, tables, table


def block_bounds(dim: int) -> list[tuple[int, int]]:
    """Three consecutive blocks of ``[0, dim)`` whose ends fall inside chunks."""
    first, second = dim // 3 + 1, (2 * dim) // 3 + 2
    return [(0, first), (first, second), (second, dim)]


def _run(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    from sketchcomm import sketch_triton

    sketch, x, tables, table = case_inputs(case)
    estimate = sketch_triton.estimate_into(sketch, table, torch.empty(sketch.dim))
    indices, values = sketch_triton.heavy_hitters(
        sketch, table, case["k"], sample_size=case["sample_size"]
    )
    level = estimate.abs().nan_to_num(nan=0.0).quantile(case["level_quantile"]).reshape(1)
    found = sketch_triton.estimates_at_least(sketch, table, level, case["capacity"])
    blocks, blocks_atomic = tables.clone(), tables.clone()
    for start, stop in block_bounds(sketch.dim):
        block = x[:, start:stop].contiguous()
        sketch_triton.sketch_into(sketch, block, blocks, offset=start)
        sketch_triton.sketch_into(sketch, block, blocks_atomic, offset=start, deterministic=False)
    return {
        "blocks": blocks,
        "blocks_atomic": blocks_atomic,
        "rows_parallel": sketch_triton.sketch_into(sketch, x, tables.clone()),
        "atomic": sketch_triton.sketch_into(sketch, x, tables.clone(), deterministic=False),
        "estimate": estimate,
        "heavy_indices": indices,
        "heavy_values": values,
        "level": level,
        "found_indices": found[0],
        "found_values": found[1],
        "found_count": found[2],
    }


def run_interpreted(
    cases: list[dict[str, Any]], timeout: float = 600
) -> list[dict[str, torch.Tensor]]:
    """The kernels' outputs for every case, computed by a fresh interpreter with
    ``TRITON_INTERPRET=1``."""
    with tempfile.TemporaryDirectory() as folder:
        spec, out = Path(folder, "cases.json"), Path(folder, "out.pt")
        spec.write_text(json.dumps(cases))
        environment = {
            **os.environ,
            "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, __file__, str(spec), str(out)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(f"the interpreted kernels failed:\n{done.stderr[-4000:]}")
        return torch.load(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cases = json.loads(Path(sys.argv[1]).read_text())
    torch.save([_run(case) for case in cases], sys.argv[2])
