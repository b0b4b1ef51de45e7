"""The hooks, the private hook, the Count Sketch and GEAR on a CUDA device.

Skipped where CUDA is absent (CI has no GPU). On a GPU machine:
``pytest tests/test_cuda.py``. Covers NCCL with world size 1 (fp32, fp16, bf16 buckets), gloo
with CUDA tensors on two real processes sharing one GPU, the sketch kernels against the CPU
computation, and the GEAR cache on CUDA against the uncompressed cache.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import CountSketch, SketchState, sketch_hook
from sketchcomm.demo.digits import load_digits, make_mlp
from sketchcomm.privacy import DPSketchState, PrivacyLedger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = ("float32", "float16", "bfloat16")


class LinearTarget(nn.Module):
    """loss = <p, t>: the gradient of ``p`` is exactly ``t``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(dim))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return (self.p * target).sum()


def _vector(rank: int, dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(100 + rank))


def _sparse(rank: int, dim: int, nonzeros: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    t = torch.zeros(dim)
    t[torch.randperm(dim, generator=g)[:nonzeros]] = torch.randn(nonzeros, generator=g) + 3.0
    return t


# ---------------------------------------------------------------------------- NCCL, world 1
def _nccl_entry(store: str, out: str) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        torch.save({"ok": True, "result": _nccl_checks()}, out)
    except BaseException as error:
        torch.save({"ok": False, "error": repr(error)}, out)
        raise
    finally:
        dist.destroy_process_group()


def _nccl_checks() -> dict[str, float]:
    device = torch.device("cuda", 0)
    results = {}
    dim = 30_000
    for name in DTYPES:
        dtype = getattr(torch, name)
        model = DDP(LinearTarget(dim).to(device, dtype), device_ids=[0])
        state = SketchState(
            rows=1, columns=30_011, recovery="dense", error_feedback="none", start_iter=0
        )
        model.register_comm_hook(state, sketch_hook)
        target = _vector(0, dim).to(device, dtype)
        model(target).backward()
        grad = model.module.p.grad
        assert grad.dtype == dtype and grad.device == device
        results[f"exact_{name}"] = ((grad.float() - target.float()).abs().max()).item()
    # Top-k with FetchSGD error feedback: a sparse gradient comes back exactly.
    model = DDP(LinearTarget(60_000).to(device), device_ids=[0])
    state = SketchState(compression=6, rows=5, topk_fraction=5 / 60_000, start_iter=0)
    model.register_comm_hook(state, sketch_hook)
    target = _sparse(0, 60_000, 5).to(device)
    model(target).backward()
    results["topk_sparse"] = (model.module.p.grad - target).abs().max().item()
    # The private hook: zero gradients and exact one-row tables release the noise alone.
    sigma, clip, dim = 1.5, 2.0, 200_000
    model = DDP(nn.Linear(dim, 1, bias=False).to(device), device_ids=[0])
    nn.init.zeros_(model.module.weight)
    private = DPSketchState(
        PrivacyLedger(accountant="rdp", delta=1e-5, unit="rank"),
        max_grad_norm=clip,
        unit="rank",
        noise_multiplier=sigma,
        min_compression_size=10**9,
    )
    private.register(model)
    model(torch.zeros(1, dim, device=device)).sum().backward()
    noise = model.module.weight.grad.flatten() * private.normalizer
    results["dp_noise_std_over_sigma_c"] = noise.std().item() / (sigma * clip)
    results["dp_ledger_steps"] = float(private.ledger.steps)
    return results


def test_nccl_world_size_one() -> None:
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        process = context.Process(target=_nccl_entry, args=(os.path.join(tmp, "store"), out))
        process.start()
        process.join(timeout=300)
        assert process.exitcode == 0, f"exit code {process.exitcode}"
        report = torch.load(out, weights_only=False)
    assert report["ok"], report.get("error")
    results = report["result"]
    print("NCCL world size 1:", results)
    assert results["exact_float32"] < 1e-6
    assert results["exact_float16"] == 0.0 and results["exact_bfloat16"] == 0.0
    assert results["topk_sparse"] < 1e-5
    assert abs(results["dp_noise_std_over_sigma_c"] - 1.0) < 0.02  # 200,000 draws: se 0.16%
    assert results["dp_ledger_steps"] == 1.0


# ---------------------------------------------------------------------------- gloo, CUDA tensors
def _gloo_cuda_worker(rank: int, world: int) -> dict[str, float]:
    device = torch.device("cuda", 0)
    results = {}
    dim = 30_000
    for name in DTYPES:
        dtype = getattr(torch, name)
        model = DDP(LinearTarget(dim).to(device, dtype))
        state = SketchState(
            rows=1, columns=30_011, recovery="dense", error_feedback="none", start_iter=0
        )
        model.register_comm_hook(state, sketch_hook)
        model(_vector(rank, dim).to(device, dtype)).backward()
        expected = sum(_vector(r, dim).to(dtype).float() for r in range(world)) / world
        grad = model.module.p.grad.float().cpu()
        results[name] = ((grad - expected).abs().max() / expected.abs().max()).item()
    # Training the digits MLP with top-k recovery on the GPU, against plain allreduce.
    data = load_digits()
    x, y = data.x_train.to(device), data.y_train.to(device)
    losses = {}
    for hook in ("allreduce", "sketch"):
        model = DDP(make_mlp(hidden=256, seed=0).to(device))
        if hook == "sketch":
            SketchState(compression=10, momentum=0.5).register(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(100):
            index = torch.arange(32) + (step * 64 + rank * 32) % (len(x) - 32)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            losses[hook] = nn.functional.cross_entropy(model(x), y).item()
    results["loss_allreduce"], results["loss_sketch"] = losses["allreduce"], losses["sketch"]
    return results


def test_gloo_with_cuda_tensors_on_two_ranks() -> None:
    results = run_ranks(_gloo_cuda_worker, 2)
    print("gloo, CUDA tensors, 2 ranks:", results[0])
    for rank_results in results:
        assert rank_results["float32"] < 1e-6
        assert rank_results["float16"] < 2e-3 and rank_results["bfloat16"] < 1e-2
        # Both learn (the loss starts at ln 10 = 2.30); top-k of 1% per step learns slower.
        assert rank_results["loss_allreduce"] < 0.5
        assert rank_results["loss_sketch"] < 1.15
    assert results[0]["loss_sketch"] == results[1]["loss_sketch"]


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_sketch_kernels_on_cuda_match_the_cpu(rows: int) -> None:
    dim = 1_000_003
    x = torch.randn(dim, generator=torch.Generator().manual_seed(rows))
    x[torch.arange(0, dim, 9973)] += 50.0  # heavy hitters
    sketch_cpu = CountSketch(dim, rows, 20_011, seed=7)
    sketch_gpu = CountSketch(dim, rows, 20_011, seed=7, device=torch.device("cuda"))
    table_cpu, table_gpu = sketch_cpu.sketch(x), sketch_gpu.sketch(x.cuda())
    torch.testing.assert_close(table_gpu.cpu(), table_cpu, rtol=1e-5, atol=1e-4)
    estimate_cpu = sketch_cpu.estimate(table_cpu)
    estimate_gpu = sketch_gpu.estimate(table_cpu.cuda())
    torch.testing.assert_close(estimate_gpu.cpu(), estimate_cpu)
    k = 101
    top_cpu = set(sketch_cpu.heavy_hitters(table_cpu, k)[0].tolist())
    top_gpu = set(sketch_gpu.heavy_hitters(table_cpu.cuda(), k)[0].cpu().tolist())
    assert len(top_cpu & top_gpu) >= k - 2  # ties at the boundary may resolve differently


# ---------------------------------------------------------------------------- GEAR
def test_gear_cache_on_cuda_follows_the_uncompressed_cache() -> None:
    transformers = pytest.importorskip("transformers")
    from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes
    from sketchcomm.gear.generation import greedy_tokens
    from sketchcomm.gear.memory import float16_nbytes

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    prompt = torch.randint(1, 512, (2, 300), device="cuda")
    mask = torch.ones_like(prompt)
    uncompressed = GEARCache(GEARConfig(bits=None), config=model.config)
    reference = greedy_tokens(model, prompt, mask, uncompressed, 8, 0)
    for bits, minimum_agreement in ((8, 1.0), (4, 0.5)):
        cache = GEARCache(GEARConfig(bits=bits, rank=2), config=model.config)
        tokens = greedy_tokens(model, prompt, mask, cache, 8, 0)
        assert tokens.device.type == "cuda"
        assert (tokens == reference).float().mean().item() >= minimum_agreement
        held, full = cache_nbytes(cache), float16_nbytes(uncompressed)
        print(f"GEAR {bits}-bit on CUDA: {held:,} bytes vs {full:,} float16 ({full / held:.2f}x)")
        assert held < full
