"""Data-parallel training of a small character-level Llama, with a GEAR-cache generation check.

Two CPU processes (gloo):

    torchrun --standalone --nproc_per_node=2 examples/train_lm.py --hook sketch --compression 20

The model is a seeded ``LlamaForCausalLM`` (``benchmarks.char_lm.BENCH_LM``, about 13M parameters;
``--tiny`` for a 0.1M-parameter one) trained on the characters of the standard library's
``pydoc_data`` topics. ``--hook`` picks what DDP sends for each gradient bucket (``allreduce``,
``fp16``, ``powersgd`` or ``sketch``), as in ``examples/train_ddp.py``.

Every ``--gear-every`` steps and after the last one, rank 0 evaluates the model while the other
ranks wait at a barrier: the held-out loss (nats per character), and
:func:`sketchcomm.gear.generation_eval`, which continues a few held-out prompts greedily with a
:class:`~sketchcomm.gear.GEARCache` and with the uncompressed cache, and reports how often the two
continuations agree and how many bytes the compressed cache held against float16. Generation
runs on a bfloat16 copy of the weights.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.gear import GEARConfig, generation_eval
from sketchcomm.hook_kinds import attach_hook, hook_kinds

# The character-level text and Llama are the benchmarks' fixture (benchmarks/char_lm.py, not part
# of the package): this example runs from a checkout of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.char_lm import (
    BENCH_LM,
    TINY_LM,
    CharText,
    lm_batches,
    lm_loss,
    load_char_text,
    make_lm,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hook",
        choices=[kind for kind in hook_kinds() if kind != "private"],
        default="sketch",
        help="what DDP sends for each bucket (default sketch)",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=128, help="characters per sequence")
    parser.add_argument("--tiny", action="store_true", help="a 0.1M-parameter model, for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data and hashes")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument("--compression", type=float, default=20.0, help="bucket / table size")

    gear = parser.add_argument_group("generation check with a GEAR cache (rank 0)")
    gear.add_argument("--gear-every", type=int, default=100, help="evaluate every N steps")
    gear.add_argument("--gear-bits", type=int, choices=(2, 4, 8), default=4, help="code bits")
    gear.add_argument("--gear-rank", type=int, default=2, help="rank of the low-rank term")
    gear.add_argument("--gear-group-size", type=int, default=32, help="entries per scale")
    gear.add_argument("--prompts", type=int, default=4, help="held-out prompts per check")
    gear.add_argument("--prompt-len", type=int, default=256, help="characters per prompt")
    gear.add_argument("--new-tokens", type=int, default=64, help="characters generated")
    args = parser.parse_args(argv)
    positive = ("steps", "batch_size", "seq_len", "log_every", "gear_every", "prompts")
    for name in (*positive, "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    shape = TINY_LM if args.tiny else BENCH_LM
    if args.prompt_len + args.new_tokens > shape.max_positions:
        parser.error(f"--prompt-len + --new-tokens must be at most {shape.max_positions}")
    return args


def held_out_prompts(text: CharText, count: int, length: int) -> list[str]:
    """``count`` prompts of ``length`` characters, evenly spaced through the held-out text."""
    stride = (text.test.numel() - length) // count
    return [text.decode(text.test[i * stride : i * stride + length]) for i in range(count)]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, text: CharText, seq_len: int) -> float:
    """Mean loss over 16 fixed held-out windows."""
    batch = next(lm_batches(text.test, 16, seq_len, seed=12345))
    was_training = model.training
    model.eval()
    loss = lm_loss(model, batch).item()
    model.train(was_training)
    return loss


def evaluate(model: torch.nn.Module, text: CharText, args: argparse.Namespace, step: int) -> None:
    """Rank 0's periodic check: held-out loss and agreement of GEAR-cached generations."""
    config = GEARConfig(
        bits=args.gear_bits, rank=args.gear_rank, group_size=args.gear_group_size, buffer_size=64
    )
    prompts = held_out_prompts(text, args.prompts, args.prompt_len)
    # Generation runs in bfloat16, as evaluation usually does; the training weights stay fp32.
    half = copy.deepcopy(model).to(torch.bfloat16)
    report = generation_eval(half, text.tokenizer(), prompts, config, args.new_tokens)
    print(
        f"eval step {step}: held-out loss {held_out_loss(model, text, args.seq_len):.4f}, "
        f"GEAR {args.gear_bits}-bit token agreement {report.token_agreement:.3f}, "
        f"prefix agreement {report.prefix_agreement:.3f}, KV bytes {report.kv_bytes:,} "
        f"({report.kv_float16_bytes / report.kv_bytes:.2f}x smaller than float16)",
        flush=True,
    )
    print(f"  sample: {report.texts[0][: args.new_tokens]!r}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("start this script with torchrun, e.g. torchrun --nproc_per_node=2 ...")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    text = load_char_text()
    model = DDP(
        make_lm(text.vocab_size, TINY_LM if args.tiny else BENCH_LM, seed=args.seed),
        # PowerSGD issues collectives from future callbacks: on gloo it needs a single bucket.
        bucket_cap_mb=1024 if args.hook == "powersgd" else 25,
    )
    options = {
        "sketch": {"compression": args.compression, "seed": args.seed},
        "powersgd": {"seed": args.seed},
    }
    attach_hook(model, args.hook, **options.get(args.hook, {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = lm_batches(text.train, args.batch_size, args.seq_len, seed=args.seed, rank=rank)
    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, next(batches))
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
        if step % args.gear_every == 0 or step == args.steps:
            if rank == 0:
                evaluate(model.module, text, args, step)
            dist.barrier()
    # Reference cycles left by training can hold tensors of the comm hook's futures; freed at
    # interpreter shutdown, after the process group is gone, they now and then abort a gloo
    # process. Collect them while everything is still alive.
    del model, optimizer, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
