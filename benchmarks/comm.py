r"""``sketchcomm bench comm``: wall-clock time of DDP communication hooks on a shaped link.

Two ranks (gloo, one CPU thread each) train the same seeded character-level Llama
(:mod:`benchmarks.char_lm`) with one hook after another: allreduce, fp16, PowerSGD, the Count Sketch
hook at several ratios, the private sketch hook and ``noop_hook`` (no communication: the compute
floor). As root, each rank runs in its own network namespace, and the two are joined by a veth
pair shaped by a token bucket filter to each ``--rates`` value (:mod:`benchmarks.netns`);
otherwise the ranks talk over the loopback interface, unshaped, and the bytes are the hook's own
count.

Per hook and rate the report gives, with ``T`` the median time of a step after ``--warmup``
steps:

* the bytes on the wire per step and rank (the veth's ``tx_bytes`` before and after the timed
  steps, both ends averaged) against the bytes the hook handed to its collectives, and their
  ratio (TCP/IP headers and acknowledgements add a few percent);
* the mean of the last five training losses and the loss on held-out text;
* the time to a target loss: the target is allreduce's training loss at step ``ceil(0.65 n)`` of
  ``n``, both smoothed by a trailing mean of five steps, and the time is the wall clock from the
  start of training to the first step whose smoothed loss reaches it;
* the compute share ``T_noop / T`` and the fraction of allreduce's communication overhead the hook
  removes, ``(T_allreduce - T) / (T_allreduce - T_noop)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.arguments import bounded_float, non_negative_int, positive_int
from benchmarks.comm_worker import HOOKS, WorkerConfig, check_hook
from benchmarks.netns import DEFAULT_PREFIX, ShapedLink, check_rate, shaped_link
from benchmarks.netns import unavailable_reason as netns_unavailable

#: the repository's root, where ``python -m benchmarks.comm_worker`` finds the worker
CHECKOUT = str(Path(__file__).resolve().parents[1])
QUICK_HOOKS = ("allreduce", "sketch-20x", "private-sketch-20x", "noop")
SMOOTHING = 5  # trailing window of the smoothed loss
TARGET_FRACTION = 0.65  # the target is allreduce's smoothed loss at this fraction of the run
MASTER_PORT = 29500


def _argument(parse: Any) -> Any:
    """An argparse type from a function that raises ``ValueError``."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``bench comm``."""
    add = parser.add_argument
    add(
        "--rates",
        nargs="+",
        type=_argument(check_rate),
        help="tc rates of the link (default: 100mbit 1gbit; --quick: 100mbit)",
    )
    add(
        "--hooks",
        nargs="+",
        type=_argument(check_hook),
        help=f"hooks to run (default: {' '.join(HOOKS)}; --quick: {' '.join(QUICK_HOOKS)})",
    )
    add(
        "--quick",
        action="store_true",
        help="tiny model, 16 steps, four hooks, one rate: about a minute",
    )
    add("--steps", type=positive_int, help="training steps per hook (default 50; --quick: 16)")
    add(
        "--warmup",
        type=non_negative_int,
        help="untimed steps before the timed ones (default 5; --quick: 4)",
    )
    add("--batch-size", type=positive_int, help="sequences per rank and step (default 8)")
    add("--seq-len", type=positive_int, help="characters per sequence (default 128; --quick: 64)")
    add(
        "--lr",
        type=bounded_float(0.0, 10.0, open_low=True),
        default=0.03,
        help="SGD learning rate, every hook (default 0.03)",
    )
    add(
        "--momentum",
        type=bounded_float(0.0, 0.999, open_low=False),
        default=0.9,
        help="momentum: in SGD for dense hooks, in sketch space for sketch hooks (default 0.9)",
    )
    add(
        "--topk-fraction",
        type=bounded_float(0.0, 1.0, open_low=True),
        default=0.01,
        help="coordinates a sketch hook recovers per bucket and step, as a fraction (default 0.01)",
    )
    add("--seed", type=non_negative_int, default=0, help="model, data and hash seed (default 0)")
    add("--eval-batches", type=positive_int, help="held-out batches (default 8; --quick: 2)")
    add(
        "--noise-multiplier",
        type=bounded_float(0.0, 1e3, open_low=False),
        default=0.01,
        help="noise multiplier sigma of the private sketch (default 0.01)",
    )
    add(
        "--max-grad-norm",
        type=bounded_float(0.0, 1e6, open_low=True),
        default=1.0,
        help="clipping norm C of each rank's tables in the private sketch (default 1)",
    )
    add(
        "--delta",
        type=bounded_float(0.0, 1.0, open_low=True),
        default=1e-5,
        help="delta of the private sketch's epsilon (default 1e-5)",
    )
    add("--loopback", action="store_true", help="use the loopback interface even as root")
    add(
        "--netns-prefix",
        default=DEFAULT_PREFIX,
        help=f"prefix of the namespace and interface names (default {DEFAULT_PREFIX})",
    )
    add("--timeout", type=positive_int, default=900, help="seconds per hook run (default 900)")
    add(
        "--from-json",
        nargs="+",
        metavar="PATH",
        help="report and plot the runs of earlier --json files instead of running",
    )
    add("--markdown", metavar="PATH", help="also write the Markdown report here")
    add("--json", metavar="PATH", help="write every step's time and loss as JSON")
    add("--plot", metavar="PATH", help="PNG of loss against wall-clock time, a panel per rate")


def _worker_config(args: argparse.Namespace, hook: str) -> WorkerConfig:
    quick = args.quick
    return WorkerConfig(
        hook=hook,
        model="tiny" if quick else "bench",
        steps=args.steps or (16 if quick else 50),
        warmup=args.warmup if args.warmup is not None else (4 if quick else 5),
        batch_size=args.batch_size or 8,
        seq_len=args.seq_len or (64 if quick else 128),
        lr=args.lr,
        momentum=args.momentum,
        topk_fraction=args.topk_fraction,
        seed=args.seed,
        eval_batches=args.eval_batches or (2 if quick else 8),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        delta=args.delta,
    )


def run(args: argparse.Namespace) -> int:
    """Run every hook at every rate (or read ``--from-json``), print the Markdown report, write
    the requested files."""
    for option in ("markdown", "json", "plot"):
        path = getattr(args, option)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"--{option} {path}: the directory does not exist")
    report = merge_reports(args.from_json) if args.from_json else measure(args)
    text = markdown_report(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """One report from the ``--json`` files of several runs: their commands and runs, in order."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--from-json {path}: {error}") from None
    merged = {**reports[0], "commands": [c for r in reports for c in r["commands"]]}
    merged["runs"] = [run for r in reports for run in r["runs"]]
    return merged


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train with every hook at every rate; the report with every run's steps."""
    hooks = list(dict.fromkeys(args.hooks or (QUICK_HOOKS if args.quick else HOOKS)))
    configs = [_worker_config(args, hook) for hook in hooks]
    if not 0 <= configs[0].warmup < configs[0].steps:
        raise ValueError(f"--warmup must be below --steps, got {configs[0].warmup}")
    reason = "--loopback given" if args.loopback else netns_unavailable()
    report: dict[str, Any] = {
        "commands": ["sketchcomm bench comm " + shlex.join(_options_given())],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "network": "veth pair between two namespaces, tbf on both ends"
        if reason is None
        else f"loopback, unshaped ({reason})",
        "config": asdict(configs[0]) | {"hook": None},
        "runs": [],
    }
    if reason is None:
        rates = list(
            dict.fromkeys(args.rates or (["100mbit"] if args.quick else ["100mbit", "1gbit"]))
        )
        with shaped_link(args.netns_prefix) as link:
            for rate in rates:
                link.shape(rate)
                report["runs"] += _run_hooks(configs, link, rate, args.timeout)
    else:
        print(
            f"network namespaces unavailable ({reason}): running on loopback without shaping; "
            "bytes are the hooks' own counts",
            file=sys.stderr,
        )
        report["runs"] += _run_hooks(configs, None, "loopback", args.timeout)
    return report


def _options_given() -> list[str]:
    """The options of this process's command line, for the report (none when called from code)."""
    if sys.argv[1:3] == ["bench", "comm"]:
        return sys.argv[3:]
    return sys.argv[1:] if Path(sys.argv[0]).stem == "comm" else []


def _run_hooks(
    configs: Sequence[WorkerConfig], link: ShapedLink | None, rate: str, timeout: float
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    runs = []
    for index, config in enumerate(tqdm(configs, desc=f"bench comm {rate}", unit="hook")):
        start = time.monotonic()
        ranks = run_ranks(config, link, MASTER_PORT + index, timeout)
        runs.append(summarise(config.hook, rate, ranks, link is not None))
        tqdm.write(f"{rate} {config.hook}: {time.monotonic() - start:.0f} s", file=sys.stderr)
    return runs


def run_ranks(
    config: WorkerConfig, link: ShapedLink | None, port: int, timeout: float
) -> list[dict[str, Any]]:
    """Start both ranks (one per namespace, or both on loopback), wait, return their results.

    A rank that fails or outlives ``timeout`` seconds ends the other one; the error carries the
    tail of the failed rank's stderr.
    """
    with tempfile.TemporaryDirectory(prefix="sketchcomm-comm-") as tmp:
        config_path = Path(tmp, "config.json")
        config_path.write_text(json.dumps(asdict(config)))
        master = link.ends[0].address if link else "127.0.0.1"
        port = port if link else _free_port()
        procs: list[subprocess.Popen] = []
        pythonpath = os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")]))
        logs = [Path(tmp, f"rank{rank}.log") for rank in range(2)]
        try:
            for rank in range(2):
                interface = link.ends[rank].interface if link else "lo"
                argv = [
                    sys.executable,
                    "-m",
                    "benchmarks.comm_worker",
                    "--config",
                    str(config_path),
                    "--out",
                    str(Path(tmp, f"rank{rank}.json")),
                ]
                if link:
                    argv = link.ends[rank].command([*argv, "--interface", interface])
                env = os.environ | {
                    "MASTER_ADDR": master,
                    "MASTER_PORT": str(port),
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "GLOO_SOCKET_IFNAME": interface,
                    "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": pythonpath,
                }
                with open(logs[rank], "w") as log:
                    procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log))
            _wait(procs, logs, config.hook, timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(2)]


def _wait(procs: list[subprocess.Popen], logs: list[Path], hook: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        for rank, proc in enumerate(procs):
            if proc.returncode not in (None, 0):
                tail = logs[rank].read_text()[-3000:]
                raise RuntimeError(f"{hook}: rank {rank} exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{hook}: the ranks did not finish within {timeout} s")
        time.sleep(0.2)
    for rank, proc in enumerate(procs):
        if proc.returncode:
            tail = logs[rank].read_text()[-3000:]
            raise RuntimeError(f"{hook}: rank {rank} exited with {proc.returncode}:\n{tail}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smoothed(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def summarise(hook: str, rate: str, ranks: list[dict[str, Any]], on_wire: bool) -> dict[str, Any]:
    """One hook's run: per-step times and losses averaged over ranks, the byte counts per rank."""
    config = ranks[0]["config"]
    times = [statistics.fmean(t) for t in zip(*(r["step_times"] for r in ranks), strict=True)]
    losses = [statistics.fmean(v) for v in zip(*(r["losses"] for r in ranks), strict=True)]
    wire = [r["wire_bytes_per_step"] for r in ranks]
    run = {
        "hook": hook,
        "rate": rate,
        "parameters": ranks[0]["parameters"],
        "step_times": times,
        "losses": losses,
        "median_step_time": statistics.median(times[config["warmup"] :]),
        "final_loss": statistics.fmean(losses[-SMOOTHING:]),
        "eval_loss": statistics.fmean(r["eval_loss"] for r in ranks),
        "hook_bytes_per_step": statistics.fmean(r["hook_bytes_per_step"] for r in ranks),
        "wire_bytes_per_step": statistics.fmean(wire) if on_wire else None,
    }
    if "privacy" in ranks[0]:
        run["privacy"] = ranks[0]["privacy"]
    return run


def add_comparisons(runs: list[dict[str, Any]]) -> None:
    """Add the target loss, time to target, compute share and overhead removed to each run,
    against the allreduce and noop runs at the same rate (None where one is missing)."""
    by_rate: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_rate.setdefault(run["rate"], {})[run["hook"]] = run
    for hooks in by_rate.values():
        allreduce, noop = hooks.get("allreduce"), hooks.get("noop")
        target = None
        if allreduce is not None:
            curve = smoothed(allreduce["losses"])
            target = curve[math.ceil(TARGET_FRACTION * len(curve)) - 1]
        for run in hooks.values():
            run["target_loss"] = target
            run["time_to_target"] = _time_to(run, target)
            t = run["median_step_time"]
            run["compute_share"] = noop["median_step_time"] / t if noop else None
            removed = None
            if allreduce and noop and allreduce["median_step_time"] > noop["median_step_time"]:
                t_ar, t_noop = allreduce["median_step_time"], noop["median_step_time"]
                removed = (t_ar - t) / (t_ar - t_noop)
            run["overhead_removed"] = removed


def _time_to(run: dict[str, Any], target: float | None) -> float | None:
    if target is None:
        return None
    elapsed = 0.0
    for step_time, loss in zip(run["step_times"], smoothed(run["losses"]), strict=True):
        elapsed += step_time
        if loss <= target:
            return elapsed
    return None


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: setup lines, then one table per rate."""
    add_comparisons(report["runs"])
    config = report["config"]
    lines = [
        *(f"Command: `{command}`" for command in report["commands"]),
        f"Machine: {report['machine']}. Network: {report['network']}.",
        f"Model: {report['runs'][0]['parameters']:,} parameters ({config['model']}), "
        f"{config['steps']} steps ({config['warmup']} untimed), {config['batch_size']} x "
        f"{config['seq_len']} characters per rank and step; SGD lr {config['lr']}, momentum "
        f"{config['momentum']} (in SGD for dense hooks, in sketch space for sketch hooks).",
    ]
    private = next((r["privacy"] for r in report["runs"] if "privacy" in r), None)
    if private:
        lines.append(
            f"Private sketch: unit of privacy = one rank (all of its data), sigma "
            f"{private['noise_multiplier']}, C {private['max_grad_norm']}: epsilon "
            f"{private['epsilon']:.3g} at delta {private['delta']:g} after {private['steps']} "
            f"steps ({private['accountant']} accountant)."
        )
    wire_note = "veth tx_bytes" if "veth" in report["network"] else "not measured (loopback)"
    header = (
        "| hook | step time | compute share | overhead removed | wire bytes/step | hook "
        "bytes/step | wire / hook | train loss | eval loss | time to target |"
    )
    for rate in dict.fromkeys(r["rate"] for r in report["runs"]):
        runs = [r for r in report["runs"] if r["rate"] == rate]
        target = runs[0]["target_loss"]
        target_text = "no allreduce run" if target is None else f"{target:.3f}"
        lines += [
            "",
            f"### {rate}",
            "",
            f"Target loss {target_text}; wire bytes: {wire_note}.",
            "",
            header,
            "|---" * 10 + "|",
        ]
        for r in runs:
            wire, hook = r["wire_bytes_per_step"], r["hook_bytes_per_step"]
            ratio = f"{wire / hook:.3f}" if wire is not None and hook else "-"
            reached = (
                "not reached" if r["time_to_target"] is None else f"{r['time_to_target']:.1f} s"
            )
            lines.append(
                f"| {r['hook']} | {r['median_step_time']:.3f} s | {_percent(r['compute_share'])} "
                f"| {_percent(r['overhead_removed'])} | {_bytes(wire)} | {_bytes(hook)} | {ratio} "
                f"| {r['final_loss']:.3f} | {r['eval_loss']:.3f} | {reached} |"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """PNG of the smoothed training loss against wall-clock time, one panel per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    add_comparisons(report["runs"])
    rates = list(dict.fromkeys(r["rate"] for r in report["runs"]))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
    for axis, rate in zip(axes[0], rates, strict=True):
        runs = [r for r in report["runs"] if r["rate"] == rate]
        for r in runs:
            elapsed, total = [], 0.0
            for step_time in r["step_times"]:
                total += step_time
                elapsed.append(total)
            color = colors(HOOKS.index(r["hook"]) % 10) if r["hook"] in HOOKS else None
            axis.plot(elapsed, smoothed(r["losses"]), label=r["hook"], color=color, linewidth=1.3)
        if runs[0]["target_loss"] is not None:
            axis.axhline(runs[0]["target_loss"], color="gray", linestyle="--", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(f"{rate}: training loss (mean of {SMOOTHING} steps)")
        axis.set_xlabel("wall-clock time since the first step (s)")
        axis.set_ylabel("loss (nats per character)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm", description=__doc__)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
