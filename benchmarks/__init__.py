"""Benchmarks of the sketchcomm kernels, run as ``sketchcomm bench <name>``.

:mod:`sketchcomm.bench.kernels` times sketching, recovery and top-k selection against a plain copy
of the same tensor.
"""
