"""Telemetry: Prometheus metrics, OpenTelemetry traces, and the wrappers that time the key provider
and the database for both.

A leaf: it knows the key-pair and storage protocols it wraps, and nothing of the HTTP layer, the
domain core or the command line (an import-linter contract says so). What it measures is handed to
it by the composition root (``keyconnector.http.app``): the plain counters other parts keep are
read through small protocols (``metrics.MirrorSources``), and token refusals arrive with a reason
code decided where they are raised.
"""
