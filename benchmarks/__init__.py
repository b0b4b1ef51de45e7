"""Benchmarks of sketchcomm against baselines measured in the same run (not part of the package).

Run from the repository's root as ``python -m benchmarks BENCHMARK`` or ``sketchcomm bench
BENCHMARK``; :data:`benchmarks.cli.BENCHMARKS` lists them. Their tests are in
``benchmarks/tests``.
"""
