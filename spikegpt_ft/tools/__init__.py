"""Tools around the trained models, each a ``main(argv)`` behind ``spikegpt-ft <tool>`` and ``python -m``.

- ``bench.py``: timings of the kernels, training steps, the parallel forward and recurrent decoding.
- ``energy.py``: operations and energy per token (inference and a training step) with or without adapters.
- ``report.py``: the runs' ``metrics.json`` as a table beside the published numbers, with intervals, and a chart.

Tools build on the library (model, ops, adapters, data, inference, runs, system, files), never on the
command line or training packages.
"""
