"""``python -m benchmarks.capture_memory --quick``: the streamed capture holds at most
``B x largest layer + B x tables`` of per-example tensors, less than Opacus's ``B x all
parameters`` on the same GPT-2 and batch."""

from __future__ import annotations

from benchmarks import capture_memory


def test_streamed_capture_holds_less_than_opacus() -> None:
    result = capture_memory.main(["--quick"])
    opacus, steps = result["opacus"], result["sketch"]
    assert opacus["peak_bytes"] == result["batch"] * opacus["parameters"] * 4
    assert not steps[0]["streaming"] and steps[-1]["streaming"]
    streamed = steps[-1]
    assert streamed["peak_bytes"] <= result["largest_layer_bytes"] + streamed["table_bytes"]
    assert streamed["peak_bytes"] < opacus["peak_bytes"] / 3
    assert steps[0]["peak_bytes"] >= opacus["peak_bytes"]  # before: every row of the bucket
