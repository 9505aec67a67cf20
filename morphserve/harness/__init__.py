"""The replay harness: open-loop real-time replay of a workload into the engine and the serving metrics.

* :mod:`morphserve.harness.replay` - the driver (:func:`~morphserve.harness.replay.replay`), the engine's
  per-step timeline, and :func:`~morphserve.harness.replay.run_replay`, the whole experiment with its files;
* :mod:`morphserve.harness.metrics` - latency distributions, SLO attainment, throughput and goodput;
* :mod:`morphserve.harness.records` - per-request result/error records and timeline rows, and their JSON/CSV files;
* :mod:`morphserve.harness.cli` - the ``workload``, ``replay`` and ``score`` subcommands.

Workloads are built by :mod:`morphserve.workloads.builder`; task quality is scored by
:mod:`morphserve.eval.quality`.
"""
