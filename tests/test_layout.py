"""The command, the package's boundary with benchmarks/, and the registry of hook kinds."""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import SketchState
from sketchcomm.hook_kinds import attach_hook, build_hook, hook_kinds, register_hook_kind
from sketchcomm.privacy import DPSketchState, PrivacyLedger

REPO = Path(__file__).resolve().parents[1]


def python(*args: str, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_python_m_sketchcomm_is_the_command() -> None:
    done = python("-m", "sketchcomm", "--help", cwd=REPO, pythonpath=REPO)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("positional arguments:")[1].split("options:")[0]
    assert [line.split()[0] for line in commands.splitlines()[2:] if line.strip()] == [
        "demo",
        "privacy",
        "audit",
        "bench",
    ]
    done = python("-m", "sketchcomm", "bench", "kernels", "--help", cwd=REPO, pythonpath=REPO)
    assert done.returncode == 0 and "--sizes" in done.stdout, done.stderr


def test_bench_without_a_checkout_says_how_to_run_the_benchmarks(tmp_path: Path) -> None:
    """An installed package (here a copy of it alone) has no benchmarks: the command says where
    they are instead of failing on an import."""
    shutil.copytree(REPO / "sketchcomm", tmp_path / "site" / "sketchcomm")
    (tmp_path / "elsewhere").mkdir()
    done = python(
        "-m",
        "sketchcomm",
        "bench",
        "kernels",
        "--quick",
        cwd=tmp_path / "elsewhere",
        pythonpath=tmp_path / "site",
    )
    assert done.returncode == 2
    assert "benchmarks/ folder of the source repository" in done.stderr
    assert "python -m benchmarks BENCHMARK" in done.stderr


def test_the_library_imports_nothing_from_benchmarks() -> None:
    for path in sorted((REPO / "sketchcomm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "benchmarks" for n in names), path


@pytest.mark.parametrize(
    "module",
    [
        "sketchcomm.hook_kinds",
        "sketchcomm.gear.config",
        "sketchcomm.gear.compression",
        "sketchcomm.gear.cache",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def _grads_with_each_kind(rank: int, world: int) -> dict[str, list[float] | str]:
    """Per kind, the gradient DDP leaves in the model after one backward pass, and the type of
    the registered state."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    results: dict[str, list[float] | str] = {}
    for kind, options in [
        ("allreduce", {}),
        ("fp16", {}),
        ("sketch", {"compression": 4.0}),
        (
            "private",
            {
                "ledger": PrivacyLedger("rdp", 1e-5, unit="rank"),
                "max_grad_norm": 1.0,
                "unit": "rank",
                "noise_multiplier": 1.0,
            },
        ),
        ("powersgd", {"rank": 1}),
    ]:
        torch.manual_seed(0)
        model = DDP(nn.Linear(16, 4))
        state = attach_hook(model, kind, **options)
        model(x).square().sum().backward()
        results[kind] = torch.cat([p.grad.flatten() for p in model.parameters()]).tolist()
        results[f"{kind} state"] = type(state).__name__
    return results


def test_every_kind_attaches_to_a_real_ddp_model() -> None:
    ranks = run_ranks(_grads_with_each_kind, 2)
    assert ranks[0] == ranks[1]  # every rank holds the same averaged gradient
    result = ranks[0]
    # The plain allreduce average, computed in this process.
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    for rank in range(2):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        (model(x).square().sum() / 2).backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(result["allreduce"]), reference)
    torch.testing.assert_close(torch.tensor(result["fp16"]), reference, rtol=2e-3, atol=2e-3)
    # The first step of PowerSGD is a plain allreduce (start_powerSGD_iter=2).
    torch.testing.assert_close(torch.tensor(result["powersgd"]), reference)
    assert result["allreduce state"] == result["fp16 state"] == "NoneType"
    assert result["sketch state"] == SketchState.__name__
    assert result["private state"] == DPSketchState.__name__
    assert result["powersgd state"] == powerSGD_hook.PowerSGDState.__name__
    # The private kind released a clipped, noised sum: not the gradient.
    assert not torch.allclose(torch.tensor(result["private"]), reference)


def test_registry_names_and_errors() -> None:
    assert hook_kinds()[:5] == ("allreduce", "fp16", "powersgd", "sketch", "private")
    with pytest.raises(ValueError, match="hook must be one of allreduce, fp16, powersgd"):
        build_hook("fp8")
    with pytest.raises(ValueError, match="already registered: pick another name"):
        register_hook_kind("sketch", lambda: (None, None), "a second sketch")
