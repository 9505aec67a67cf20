"""Workloads for open-loop replay: request-arrival traces (``traces``) loaded from public data or generated, cut to a
window and scaled to the hardware under test."""
