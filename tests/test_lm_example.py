"""The language-model example under a real ``torchrun``: DDP training of a character-level Llama
with the sketch hook, and rank 0's periodic generation check through a GEAR cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_lm.py"


@pytest.mark.slow
def test_lm_example_trains_and_checks_generation_with_a_gear_cache() -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLE),
        "--tiny",
        "--hook",
        "sketch",
        "--steps",
        "20",
        "--log-every",
        "1",
        "--gear-every",
        "10",
        "--prompts",
        "2",
        "--prompt-len",
        "128",
        "--new-tokens",
        "16",
        "--gear-group-size",
        "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    losses = [float(x) for x in re.findall(r"^step \d+/20 loss ([\d.]+)$", done.stdout, re.M)]
    assert len(losses) == 20
    assert max(losses[-3:]) < losses[0] - 0.5  # from ln(103) = 4.6 towards the unigram entropy
    checks = re.findall(
        r"^eval step (\d+): held-out loss ([\d.]+), GEAR 4-bit token agreement ([\d.]+), "
        r"prefix agreement ([\d.]+), KV bytes ([\d,]+) \(([\d.]+)x smaller than float16\)$",
        done.stdout,
        re.M,
    )
    assert [int(c[0]) for c in checks] == [10, 20]
    for _, loss, token, prefix, kv_bytes, ratio in checks:
        assert 0.0 <= float(prefix) <= float(token) <= 1.0
        assert int(kv_bytes.replace(",", "")) > 0 and float(ratio) > 1.0
        assert float(loss) < 4.6
