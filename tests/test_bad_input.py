"""Bad input, one case per row of the matrix in docs/reliability.md (the test ids match).

Each case gives a clear error that names the problem, or a documented safe behaviour checked
against an independent reference; none may hang, crash deep inside torch or give a silently wrong
result. The cases that need several processes share one real 2-rank gloo group
(:func:`cross_rank_outcomes`, run once per test process); each of them builds a fresh DDP model,
since a DDP model whose backward raised cannot be used again.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import RankFailed, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import SketchState
from sketchcomm.demo.private_training import resume_step
from sketchcomm.privacy import (
    DPSketchState,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    dp_sketch_hook,
)
from sketchcomm.privacy.model_checks import validate_private_model
from sketchcomm.sketch import CountSketch

DIM = 50  # elements of the Target model's single parameter
SAMPLE_RATE, DATASET_SIZE = 0.1, 100


class Target(nn.Module):
    """loss = sum_i <w, t_i>: example i's gradient of w is its input row t_i."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, 1, bias=False)
        nn.init.zeros_(self.layer.weight)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.layer(rows).sum()


def _rows(rank: int, count: int = 4) -> torch.Tensor:
    return torch.arange(count * DIM, dtype=torch.float32).reshape(count, DIM) / 50 + rank


def _ledger(**kwargs: Any) -> PrivacyLedger:
    return PrivacyLedger("rdp", 1e-5, **kwargs)


def _exact_dp_state(ledger: PrivacyLedger | None = None, **kwargs: Any) -> DPSketchState:
    """Per-example clipping to C = 1 without noise (sigma = 0) and an exact one-row table, so the
    update is exactly sum_i clip(t_i) / (q N)."""
    options = {
        "noise_multiplier": 0.0,
        "min_compression_size": 10**9,
        "sample_rate": SAMPLE_RATE,
        "dataset_size": DATASET_SIZE,
        **kwargs,
    }
    return DPSketchState(ledger or _ledger(), 1.0, unit="example", **options)


def _clipped_mean(rows: torch.Tensor) -> torch.Tensor:
    """The reference release: rows clipped to norm 1 (finite rows only), summed, over q N."""
    rows = rows[torch.isfinite(rows).all(1)]
    factors = (1.0 / (rows.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (rows * factors[:, None]).sum(0) / (SAMPLE_RATE * DATASET_SIZE)


def _outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", action()
    except Exception as error:
        return type(error).__name__, str(error)


# ---------------------------------------------------------------------------- 2-rank cases
def _backward(model: DDP, rows: torch.Tensor) -> torch.Tensor:
    model(rows).backward()
    return model.module.layer.weight.grad.flatten().clone()


def _sketched(**options: Any) -> DDP:
    """DDP on Target with the sketch hook: one row of 23 columns for the 50-element bucket."""
    model = DDP(Target())
    SketchState(
        **{"start_iter": 0, "min_compression_size": 1, "rows": 1, "compression": 2.0, **options}
    ).register(model)
    return model


def _dp_model(state: DPSketchState) -> DDP:
    model = DDP(Target())
    state.register(model)
    return model


def _integer_buffers(rank: int) -> dict[str, Any]:
    """BatchNorm's int64 ``num_batches_tracked`` and an int64 parameter that cannot require grad:
    DDP buckets only parameters that require grad (floating point), and broadcasts buffers from
    rank 0 outside the hook. Exact columns: the hook must equal DDP's own allreduce."""
    grads = []
    for hook in (False, True):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(DIM, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        module.register_parameter(
            "step_count", nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
        )
        model = DDP(module)
        if hook:
            state = SketchState(
                start_iter=0, min_compression_size=1, columns=521, rows=1, recovery="dense"
            )
            state.register(model)
        model(_rows(rank)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad]))
    buffer = module[1].num_batches_tracked
    return {
        "difference": (grads[0] - grads[1]).abs().max().item(),
        "compressed": state.stats.compressed_buckets,
        "buffer": (buffer.dtype, buffer.item()),
    }


def cross_rank_worker(rank: int, world: int) -> dict[str, tuple[str, Any]]:
    rows = _rows(rank)
    outcomes = {
        "ranks-differ-seed": _outcome(lambda: _backward(_sketched(seed=rank), rows)),
        "ranks-differ-compression": _outcome(
            lambda: _backward(_sketched(compression=2.0 + rank), rows)
        ),
        "ranks-differ-noise-multiplier": _outcome(
            lambda: _backward(_dp_model(_exact_dp_state(noise_multiplier=1.0 + rank)), rows)
        ),
        "hook-registered-without-state": _outcome(lambda: _backward(_unbound_dp_model(), rows)),
        "nan-gradient-raise": _outcome(
            lambda: _backward(
                _sketched(nonfinite="raise"),
                _nan_on_rank1(rows, rank),
            )
        ),
        "nan-gradient-propagate": _outcome(
            lambda: _backward(_sketched(), _nan_on_rank1(rows, rank)).isnan().all().item()
        ),
    }
    nan_rows = rows.clone()
    if rank == 1:
        nan_rows[2, 3] = math.nan
    outcomes["nan-gradient-private"] = _outcome(
        lambda: (_backward(_dp_model(_exact_dp_state()), nan_rows), nan_rows)
    )
    local = rows if rank == 0 else rows[:0]
    state = _exact_dp_state()
    outcomes["empty-poisson-batch"] = _outcome(
        lambda: (_backward(_dp_model(state), local), local, state.ledger.steps)
    )
    outcomes["integer-buffers-and-parameters"] = _outcome(lambda: _integer_buffers(rank))
    return outcomes


def _nan_on_rank1(rows: torch.Tensor, rank: int) -> torch.Tensor:
    return rows * math.nan if rank == 1 else rows


def _unbound_dp_model() -> DDP:
    model = DDP(Target())
    model.register_comm_hook(_exact_dp_state(), dp_sketch_hook)
    return model


@cache
def _cross_rank_run() -> tuple[dict[str, tuple[str, Any]], ...] | RankFailed:
    try:
        return tuple(run_ranks(cross_rank_worker, 2, timeout=120))
    except RankFailed as failure:  # kept, so that the other cases fail at once, not run again
        return failure


def cross_rank_outcomes() -> tuple[dict[str, tuple[str, Any]], ...]:
    """Every 2-rank case's outcome on each rank, from one run of :func:`cross_rank_worker`."""
    result = _cross_rank_run()
    if isinstance(result, RankFailed):
        raise result
    return result


def _same_error_on_both_ranks(case: str, error: str, pattern: str) -> None:
    for outcomes in cross_rank_outcomes():
        kind, message = outcomes[case]
        assert kind == error, message
        assert re.search(pattern, message), message


def _ok_on_both_ranks(case: str) -> list[Any]:
    results = []
    for outcomes in cross_rank_outcomes():
        kind, value = outcomes[case]
        assert kind == "ok", value
        results.append(value)
    return results


def check_private_nan_example() -> None:
    """One example's NaN is left out of the sum (weight 0): the release is the clipped sum of the
    finite examples of both ranks, not NaN."""
    (grad0, rows0), (grad1, rows1) = _ok_on_both_ranks("nan-gradient-private")
    expected = _clipped_mean(torch.cat([rows0, rows1]))
    assert torch.isfinite(grad0).all()
    torch.testing.assert_close(grad0, expected)
    torch.testing.assert_close(grad1, expected)


def check_empty_batch() -> None:
    """An empty Poisson batch on rank 1: it contributes nothing, still adds its noise share and
    takes the step; the ledger counts the step once."""
    (grad0, rows0, steps0), (grad1, rows1, steps1) = _ok_on_both_ranks("empty-poisson-batch")
    assert len(rows1) == 0 and steps0 == steps1 == 1
    expected = _clipped_mean(rows0)
    torch.testing.assert_close(grad0, expected)
    torch.testing.assert_close(grad1, expected)


def check_integer_buffers() -> None:
    for result in _ok_on_both_ranks("integer-buffers-and-parameters"):
        assert result["difference"] < 1e-6
        assert result["compressed"] == 1
        assert result["buffer"] == (torch.int64, 1)


def check_nan_propagates() -> None:
    assert _ok_on_both_ranks("nan-gradient-propagate") == [True, True]


# ---------------------------------------------------------------------------- 1-process cases
def _file_case(content: str | bytes, pattern: str) -> Callable[[Path], None]:
    def check(tmp_path: Path) -> None:
        path = tmp_path / "ledger.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        before = path.read_bytes()
        with pytest.raises(LedgerError, match=pattern):
            PrivacyLedger("rdp", 1e-5, path=path)
        assert path.read_bytes() == before

    return check


def _other_accountant_file() -> str:
    ledger = PrivacyLedger("prv", 1e-5)
    ledger.record_step(1.0, 0.01)
    return json.dumps(ledger.state_dict())


def check_budget_spent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", 1e-5, budget=2.0, path=path)
    while not ledger.would_exceed(1.0, 0.1):
        ledger.record_step(1.0, 0.1)
    before = path.read_bytes()
    with pytest.raises(
        PrivacyBudgetExceeded, match=r"above the budget of 2 .*nothing was recorded"
    ):
        ledger.record_step(1.0, 0.1)
    assert path.read_bytes() == before and ledger.epsilon <= 2.0


def check_columns_above_bucket() -> None:
    """More columns than elements: documented exact recovery (a table larger than the vector)."""
    vector = torch.randn(100, generator=torch.Generator().manual_seed(0))
    sketch = CountSketch(100, 1, 1009)
    torch.testing.assert_close(sketch.estimate(sketch.sketch(vector)), vector)


def check_rows_above_bucket() -> None:
    """More rows than the bucket can fill at this compression: the bucket is sent uncompressed."""
    state = SketchState(rows=64, min_compression_size=1)
    assert state.config.table_shape_for(1000) is None
    private = DPSketchState(_ledger(unit="rank"), 1.0, unit="rank", noise_multiplier=1.0, rows=64)
    assert private.config.table_shape_for(1000) == (1, 1000)


def _error(error: type[Exception], pattern: str, action: Callable[[], Any]) -> Callable[[], None]:
    def check() -> None:
        with pytest.raises(error, match=pattern):
            action()

    return check


def _cross(case: str, error: str, pattern: str) -> Callable[[], None]:
    return lambda: _same_error_on_both_ranks(case, error, pattern)


def case(name: str, check: Callable[..., None], *, ranks: bool = False) -> Any:
    marks = [pytest.mark.xdist_group("bad-input-ranks")] if ranks else []
    return pytest.param(check, id=name, marks=marks)


def _rank_dp_state(**kwargs: Any) -> DPSketchState:
    unit = kwargs.pop("unit", "rank")
    return DPSketchState(_ledger(unit=unit), kwargs.pop("max_grad_norm", 1.0), unit=unit, **kwargs)


CASES = [
    # SketchState
    case(
        "sketchstate-compression-not-a-number",
        _error(ValueError, "compression must be a number", lambda: SketchState(compression="20")),
    ),
    case(
        "sketchstate-compression-at-most-1",
        _error(
            ValueError, r"compression must be a number in \(1.0", lambda: SketchState(compression=1)
        ),
    ),
    case(
        "sketchstate-rows-zero",
        _error(ValueError, "rows must be an integer >= 1", lambda: SketchState(rows=0)),
    ),
    case(
        "sketchstate-topk-fraction-above-1",
        _error(ValueError, "topk_fraction", lambda: SketchState(topk_fraction=1.5)),
    ),
    case(
        "sketchstate-momentum-1",
        _error(ValueError, "momentum must be below 1", lambda: SketchState(momentum=1.0)),
    ),
    case(
        "sketchstate-unknown-recovery",
        _error(ValueError, "recovery must be one of", lambda: SketchState(recovery="mean")),
    ),
    case(
        "sketchstate-seed-negative",
        _error(ValueError, "seed must be an integer >= 0", lambda: SketchState(seed=-1)),
    ),
    case(
        "sketchstate-process-group-not-a-group",
        _error(ValueError, "process_group must be", lambda: SketchState(process_group="world")),
    ),
    case("sketchstate-rows-above-bucket", check_rows_above_bucket),
    # CountSketch
    case(
        "countsketch-dim-not-an-integer",
        _error(ValueError, "dim must be a positive integer", lambda: CountSketch(10.0, 1, 5)),
    ),
    case(
        "countsketch-columns-below-sqrt-dim",
        _error(ValueError, "columns must be at least", lambda: CountSketch(10_000, 1, 10)),
    ),
    case(
        "countsketch-vector-of-wrong-length",
        _error(
            ValueError,
            "flat vector of 100 elements",
            lambda: CountSketch(100, 3, 11).sketch(torch.ones(5)),
        ),
    ),
    case(
        "countsketch-integer-vector",
        _error(
            TypeError,
            "floating point",
            lambda: CountSketch(100, 3, 11).sketch(torch.ones(100, dtype=torch.int64)),
        ),
    ),
    case("countsketch-columns-above-bucket", check_columns_above_bucket),
    # DPSketchState
    case(
        "dpstate-max-grad-norm-zero",
        _error(
            ValueError,
            "max_grad_norm must be",
            lambda: _rank_dp_state(max_grad_norm=0.0, noise_multiplier=1.0),
        ),
    ),
    case(
        "dpstate-unknown-unit",
        _error(
            ValueError,
            "unit must be one of",
            lambda: _rank_dp_state(unit="user", noise_multiplier=1.0),
        ),
    ),
    case(
        "dpstate-noise-multiplier-nan",
        _error(
            ValueError,
            "noise_multiplier must be",
            lambda: _rank_dp_state(noise_multiplier=math.nan),
        ),
    ),
    case(
        "dpstate-sample-rate-zero",
        _error(
            ValueError,
            r"sample_rate must be a number in \(0.0, 1.0\]",
            lambda: _exact_dp_state(sample_rate=0.0),
        ),
    ),
    case(
        "dpstate-sample-rate-above-1",
        _error(
            ValueError,
            r"sample_rate must be a number in \(0.0, 1.0\]",
            lambda: _rank_dp_state(sample_rate=1.5, noise_multiplier=1.0),
        ),
    ),
    case(
        "dpstate-delta-not-below-1-over-n",
        _error(
            ValueError,
            r"delta \(1e-05\) must be below 1/dataset_size",
            lambda: _exact_dp_state(dataset_size=10**6),
        ),
    ),
    case(
        "dpstate-target-epsilon-without-steps",
        _error(ValueError, "one of steps and epochs", lambda: _rank_dp_state(target_epsilon=4.0)),
    ),
    case(
        "dpstate-local-error-feedback",
        _error(
            ValueError,
            "not private",
            lambda: _rank_dp_state(noise_multiplier=1.0, error_feedback="local"),
        ),
    ),
    case(
        "dpstate-ledger-of-another-unit",
        _error(
            ValueError,
            "the ledger accounts for unit='example'",
            lambda: DPSketchState(_ledger(), 1.0, unit="rank", noise_multiplier=1.0),
        ),
    ),
    case(
        "dpstate-unsupported-layer",
        _error(
            ValueError,
            r"trained privately with unit=.example.:\n- 2 \(BatchNorm1d\) uses batch .*GroupNorm",
            lambda: validate_private_model(
                nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4)), "example", False
            ),
        ),
    ),
    case(
        "integer-parameter-requiring-grad",
        _error(
            RuntimeError,
            "floating point and complex dtype can require gradients",
            lambda: nn.Parameter(torch.zeros(3, dtype=torch.int64)),
        ),
    ),
    # PrivacyLedger
    case(
        "ledger-unknown-accountant",
        _error(ValueError, "accountant must be one of", lambda: PrivacyLedger("moments", 1e-5)),
    ),
    case(
        "ledger-delta-not-below-1-over-n",
        _error(
            ValueError,
            "delta must be below 1/dataset_size",
            lambda: PrivacyLedger("rdp", 1e-3, dataset_size=1437),
        ),
    ),
    case(
        "ledger-budget-infinite",
        _error(ValueError, "budget must be a finite number > 0", lambda: _ledger(budget=math.inf)),
    ),
    case(
        "ledger-writer-not-a-bool",
        _error(ValueError, "writer must be a bool", lambda: _ledger(writer="no")),
    ),
    case(
        "ledger-step-sample-rate-above-1",
        _error(
            ValueError, r"sample_rate must be in \(0, 1\]", lambda: _ledger().record_step(1.0, 1.5)
        ),
    ),
    case("ledger-budget-spent", check_budget_spent),
    case(
        "ledger-file-corrupt",
        _file_case(b'{"format": "sketchcomm-privacy-ledger", "sch', "not valid JSON"),
    ),
    case(
        "ledger-file-of-another-accountant",
        _file_case(_other_accountant_file(), "written with accountant='prv'"),
    ),
    case(
        "ledger-file-not-a-ledger",
        _file_case("[1, 2, 3]", "not a valid privacy ledger: expected a JSON object"),
    ),
    case(
        "resume-with-ledger-behind-checkpoint",
        _error(
            RuntimeError,
            "ledger holds 0 steps but the checkpoint .* step 8",
            lambda: resume_step(8, 0),
        ),
    ),
    # two ranks, one process group
    case(
        "ranks-differ-seed",
        _cross("ranks-differ-seed", "ValueError", "differs across ranks.*seed ranges from 0 to 1"),
        ranks=True,
    ),
    case(
        "ranks-differ-compression",
        _cross("ranks-differ-compression", "ValueError", "differs across ranks.*columns ranges"),
        ranks=True,
    ),
    case(
        "ranks-differ-noise-multiplier",
        _cross(
            "ranks-differ-noise-multiplier", "ValueError", "noise_multiplier ranges from 1 to 2"
        ),
        ranks=True,
    ),
    case(
        "hook-registered-without-state",
        _cross("hook-registered-without-state", "RuntimeError", r"state.register\(ddp_model\)"),
        ranks=True,
    ),
    case(
        "nan-gradient-raise",
        _cross(
            "nan-gradient-raise",
            "RuntimeError",
            "FloatingPointError: non-finite gradient in bucket 0",
        ),
        ranks=True,
    ),
    case("nan-gradient-propagate", check_nan_propagates, ranks=True),
    case("nan-gradient-private", check_private_nan_example, ranks=True),
    case("empty-poisson-batch", check_empty_batch, ranks=True),
    case("integer-buffers-and-parameters", check_integer_buffers, ranks=True),
]


@pytest.mark.parametrize("check", CASES)
def test_bad_input(check: Callable[..., None], tmp_path: Path) -> None:
    if "tmp_path" in inspect.signature(check).parameters:
        check(tmp_path)
    else:
        check()
