"""The `>>>` examples in the privacy, reporting and validation docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sketchcomm.validation",
    "sketchcomm.privacy.accounting",
    "sketchcomm.privacy.ledger",
    "sketchcomm.privacy.ledger_file",
    "sketchcomm.privacy.calibration",
    "sketchcomm.report",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
