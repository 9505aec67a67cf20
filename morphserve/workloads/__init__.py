"""Workloads for open-loop replay: request-arrival traces loaded from public data or generated, cut to a window and
scaled to the hardware under test (``traces``), paired with real task inputs by the other modules of this package."""
