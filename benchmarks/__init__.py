"""The public STRIDE benchmark: a 2-CPU-core setting, STRIDE against every baseline, and ablations.

``python -m benchmarks.run`` regenerates everything (cached under ``benchmarks/cache/``) and
writes ``benchmarks/RESULTS.md``; ``--quick`` is a < 60 s smoke configuration. See
docs/benchmarks.md for the setting and the protocol.
"""
