"""Evaluation loop, generation_eval and the gear benchmark command, on a tiny random Llama."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks import gear as gear_cli
from benchmarks.gear_evaluate import Candidate, decode_in_lockstep, evaluate_caches, markdown_table
from benchmarks.gear_frontier import block_compressor
from benchmarks.gear_simulate import simulate
from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes, generation_eval
from sketchcomm.gear.generation import agreement, greedy_tokens, left_pad

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small models gain nothing from more, and workers share cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def small(**kwargs) -> GEARConfig:
    return GEARConfig(**{"group_size": 16, "buffer_size": 16, "corrected": "both", **kwargs})


def test_evaluate_caches_against_independent_references(model) -> None:
    ids = torch.randint(3, 64, (2, 57), generator=torch.Generator().manual_seed(3))
    prefill = 24
    reference = Candidate("dynamic", lambda: DynamicCache(config=model.config))
    candidates = [
        Candidate("off", lambda: GEARCache(small(bits=None), config=model.config)),
        Candidate("8-bit", lambda: GEARCache(small(bits=8), config=model.config)),
        Candidate("2-bit", lambda: GEARCache(small(bits=2, rank=2), config=model.config)),
    ]
    results = evaluate_caches(model, ids, prefill, candidates, reference, generate_tokens=8)
    ref, off, eight, two = results

    # Perplexity of the step-by-step decode equals that of one full teacher-forced forward.
    with torch.inference_mode():
        logp = model(ids).logits.float().log_softmax(-1)
    targets = ids[:, prefill + 1 :]
    nll = -logp[:, prefill:-1].gather(-1, targets[..., None]).mean()
    assert ref.perplexity == pytest.approx(nll.exp().item(), rel=1e-4)

    assert off.perplexity == ref.perplexity and off.kl_divergence == 0.0
    assert off.top1_agreement == 1.0 and off.greedy_prefix_agreement == 1.0
    assert off.kv_bytes == ref.kv_bytes
    assert 0.0 < eight.kl_divergence < two.kl_divergence
    assert two.kv_bytes < eight.kv_bytes < ref.kv_bytes

    # float16 size: layers x (K, V) x batch x kv_heads x head_dim x tokens x 2 bytes.
    assert ref.kv_float16_bytes == 2 * 2 * 2 * 2 * 16 * (57 - 1) * 2
    assert ref.compression == pytest.approx(0.5)  # the tiny model runs in float32
    table = markdown_table(results)
    assert table.count("\n") == 1 + len(results)
    assert "| 2-bit |" in table


def test_agreement_and_left_padding() -> None:
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    tokens = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])
    token, prefix = agreement(tokens, reference)
    assert token == pytest.approx(7 / 8)
    assert prefix == pytest.approx((2 / 4 + 1) / 2)
    ids, mask = left_pad([[7, 8, 9], [5]], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_eval(model, tokenizer) -> None:
    prompts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18", "w40 w41 w42"]
    model.train()
    off = generation_eval(model, tokenizer, prompts, small(bits=None), max_new_tokens=12)
    assert model.training  # the mode is restored
    model.eval()
    assert off.texts == off.reference_texts
    assert off.token_agreement == 1.0 and off.prefix_agreement == 1.0

    # The left-padded batch continues each prompt as an unpadded run of that prompt alone does.
    for prompt, text in zip(prompts, off.reference_texts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        alone = greedy_tokens(
            model, ids, torch.ones_like(ids), DynamicCache(config=model.config), 12, 0
        )
        assert tokenizer.decode(alone[0], skip_special_tokens=True) == text

    gear = generation_eval(model, tokenizer, prompts, small(bits=2, rank=2), max_new_tokens=12)
    assert 0.0 <= gear.prefix_agreement <= gear.token_agreement + 1e-6 <= 1.0 + 1e-6
    assert 0 < gear.kv_bytes < 2 * gear.kv_float16_bytes
    assert set(gear.metrics()) >= {"gear/token_agreement", "gear/kv_compression"}
    with pytest.raises(ValueError, match="prompts"):
        generation_eval(model, tokenizer, [], small(bits=2))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gear_cli.configure(parser)
    return parser.parse_args(argv)


def test_cli_help_explains_every_option() -> None:
    parser = argparse.ArgumentParser(description=gear_cli.__doc__)
    gear_cli.configure(parser)
    text = parser.format_help()
    for option in (
        "--bits",
        "--rank",
        "--outlier-ratio",
        "--group-size",
        "--buffer-size",
        "--tokens",
        "--prefill",
        "--json",
        "--no-quanto",
        "--model",
        "--frontier",
        "--prefills",
        "--texts",
        "--value-group-size",
        "--outlier-scope",
    ):
        assert option in text
    assert all(action.help for action in parser._actions)
    with pytest.raises(ValueError, match="--rank"):
        gear_cli.gear_configs(parse(["--bits", "4", "2", "--rank", "1", "2", "3"]))
    with pytest.raises(ValueError, match="buffer_size"):
        gear_cli.run(parse(["--group-size", "32", "--buffer-size", "48"]))
    for bad in (["--tokens", "0"], ["--outlier-ratio", "0.5"], ["--rank", "-1"], ["--bits", "5"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_cli_runs_end_to_end(tmp_path, model, tokenizer, capsys) -> None:
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(5)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, 60, (400,), generator=generator)))
    out = tmp_path / "out" / "report.json"
    args = parse(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--dtype",
            "float32",
            "--text-file",
            str(text),
            "--prefill",
            "32",
            "--tokens",
            "20",
            "--batch-size",
            "2",
            "--generate",
            "6",
            "--bits",
            "4",
            "2",
            "--rank",
            "1",
            "2",
            "--group-size",
            "16",
            "--buffer-size",
            "16",
            "--json",
            str(out),
            "--no-quanto",
        ]
    )
    assert gear_cli.run(args) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0].startswith("uncompressed")
    assert sum(n.startswith("GEAR") for n in names) == 2
    assert sum(n.startswith("quant-only") for n in names) == 2
    assert not any(n.startswith("quanto") for n in names)
    gear_rows = [r for r in report["results"] if r["name"].startswith("GEAR")]
    assert [r["settings"]["rank"] for r in gear_rows] == [1, 2]
    assert report["markdown"] in capsys.readouterr().out


def test_quanto_candidates_follow_the_options(model) -> None:
    args = parse(["--bits", "8", "4", "--group-size", "32", "--buffer-size", "96"])
    candidates, notes = gear_cli.build_candidates(args, model)
    names = [c.name for c in candidates]
    assert names[:2] == [
        "quant-only 8-bit g32/64 r0 s0% nb96",
        "GEAR 8-bit g32/64 r1 s0% nb96 keys",
    ]
    assert any("8 bits" in note for note in notes)
    quanto = [c for c in candidates if c.settings["kind"] == "quanto"]
    if quanto:
        assert quanto[0].settings == {
            "kind": "quanto",
            "nbits": 4,
            "q_group_size": 32,
            "residual_length": 96,
        }
    else:
        assert any("not installed" in note for note in notes)


@pytest.mark.slow
def test_quanto_cache_bytes_come_from_its_packed_tensors(model) -> None:
    """Slow on first use: optimum-quanto compiles its C++ extension (tens of seconds)."""
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    cache = QuantizedCache(
        backend="quanto", config=model.config, nbits=4, q_group_size=16, residual_length=16
    )
    ids = torch.randint(3, 64, (2, 50), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        model(ids[:, :40], cache=cache, use_cache=True)
        for i in range(40, 50):
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
    expected = 0
    for layer in cache.layers:
        expected += (layer.keys.numel() + layer.values.numel()) * 4  # float32 residual
        for q in (layer._quantized_keys, layer._quantized_values):
            packed = q._data._data
            assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2
            expected += packed.numel() + q._scale.nbytes + q._shift.nbytes
    assert cache_nbytes(cache) == expected


@pytest.mark.parametrize("prefill", [40, 48])
def test_one_pass_computation_equals_the_decoding_loop(model, prefill) -> None:
    """The one-pass teacher-forced computation gives the decoding loop's likelihood and bytes,
    with the prompt length a multiple of the block or not."""
    half = copy.deepcopy(model).half()  # a float16 cache: the buffer counts 2 bytes per entry
    ids = torch.randint(3, 64, (2, 81), generator=torch.Generator().manual_seed(8))
    config = small(bits=2, rank=1, outlier_ratio=0.02)
    loop = decode_in_lockstep(half, ids, prefill, [GEARCache(config, config=half.config)])[0]
    one_pass = simulate(half, ids, prefill, 16, block_compressor(config, half.config))
    assert one_pass.nll.sum().item() == pytest.approx(loop.nll, rel=2e-3)
    assert one_pass.kv_bytes == cache_nbytes(loop.cache)
    exact = simulate(model, ids, prefill, 16, block_compressor(None, None), torch.float32)
    assert exact.kv_bytes == 2 * exact.kv_float16_bytes  # float32 entries, every one counted
    with torch.inference_mode():
        logits = model(ids).logits[:, prefill:-1].log_softmax(-1)
    expected = -logits.gather(-1, ids[:, prefill + 1 :, None]).sum()
    assert exact.nll.sum().item() == pytest.approx(expected.item(), rel=1e-5)
    # Compression changes the predictions: the computation does not ignore the compressor.
    assert one_pass.nll.sum().item() != pytest.approx(exact.nll.sum().item(), rel=1e-4)


def test_frontier_runs_end_to_end(tmp_path, model, tokenizer, capsys) -> None:
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out, plot = tmp_path / "frontier.json", tmp_path / "frontier.png"
    args = parse(
        [
            *("--model", str(tmp_path / "tiny"), "--dtype", "float32", "--frontier", "--quick"),
            *("--bits", "4", "3", "--group-size", "16", "--buffer-size", "16"),
            *("--json", str(out), "--plot", str(plot)),
        ]
    )
    assert gear_cli.run(args) == 0
    report = json.loads(out.read_text())
    points = report["points"]
    assert [(p["method"], p["bits"]) for p in points] == [
        ("quant-only", 4),
        ("GEAR", 4),
        ("quant-only", 3),
        ("GEAR", 3),
    ]
    assert all(p["text"] == "docstrings" and p["prefill"] == 64 for p in points)
    # Every byte counted: GEAR holds more than quantization alone, 3 bits less than 4.
    by = {(p["method"], p["bits"]): p["kv_bytes"] for p in points}
    assert by["quant-only", 3] < by["quant-only", 4] < by["GEAR", 4]
    assert all(1 < p["compression"] < 16 for p in points)
    assert plot.stat().st_size > 0
    assert report["markdown"] in capsys.readouterr().out
