"""Run a function on ``world_size`` real processes joined by a gloo process group.

``run_ranks(fn, world_size, *args)`` spawns one process per rank, initialises
``torch.distributed`` with gloo through a file store, calls ``fn(rank, world_size, *args)`` and
returns the per-rank results in rank order. The ranks are forked from a server process that
imported torch and sketchcomm once per test process (a fresh interpreter per rank would pay
torch's import, seconds, every time) and run with the caller's environment variables, as spawned
processes would. A failure on any rank ends the others at once and is
re-raised here with the rank's traceback; a rank that does not finish within ``timeout`` seconds
fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: What the server process imports before it forks the ranks.
PRELOADED = ["torch", "torch.distributed", "torch.nn.parallel", "sketchcomm", "sketchcomm.privacy"]


class RankFailed(RuntimeError):
    pass


def _entry(
    fn: Callable, rank: int, world: int, store: str, out: str, args: tuple, environment: dict
) -> None:
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException as error:
        torch.save({"ok": False, "error": repr(error), "trace": traceback.format_exc()}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 240.0) -> list[Any]:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    environment = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            context.Process(
                target=_entry, args=(fn, r, world_size, store, outs[r], args, environment)
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if not p.is_alive() and os.path.exists(outs[r]):
                    report = torch.load(outs[r], weights_only=False)
                    if not report["ok"]:
                        failed = (r, report)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        reports = [torch.load(o, weights_only=False) if os.path.exists(o) else None for o in outs]
        for r, report in enumerate(reports):
            if report is not None and not report["ok"]:
                failed = failed or (r, report)
        if failed:
            r, report = failed
            raise RankFailed(f"rank {r} failed: {report['error']}\n{report['trace']}")
        for r, report in enumerate(reports):
            if report is None:
                code = procs[r].exitcode
                raise RankFailed(
                    f"rank {r} ended without a result (exit code {code})"
                    if code is not None and code >= 0
                    else f"rank {r} did not finish within {timeout} s"
                )
        return [report["result"] for report in reports]
