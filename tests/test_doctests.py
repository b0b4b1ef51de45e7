"""Every ``>>>`` example in the package runs and gives what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sketchcomm


def _module_names() -> list[str]:
    prefix = sketchcomm.__name__ + "."
    found = pkgutil.walk_packages(sketchcomm.__path__, prefix)
    # __main__ runs the command when imported: it holds no examples.
    names = sorted(info.name for info in found if not info.name.endswith(".__main__"))
    return [sketchcomm.__name__, *names]


@pytest.mark.parametrize("name", _module_names())
def test_examples_in_module(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # an optional extra that is not installed
        pytest.skip(f"{name} needs an optional dependency: {error}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_package_has_examples() -> None:
    finder = doctest.DocTestFinder()
    examples = 0
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        examples += sum(len(test.examples) for test in finder.find(module))
    assert examples >= 20, examples


def test_a_failing_example_fails() -> None:
    """The check above cannot pass on a wrong example."""

    def wrong() -> None:
        """
        >>> 1 + 1
        3
        """

    test = doctest.DocTestFinder().find(wrong, "wrong", globs={})[0]
    runner = doctest.DocTestRunner(verbose=False)
    runner.run(test, out=lambda _: None)
    assert runner.failures == 1
