"""The edge agent's optional Prometheus metrics (``metrics_port``; off by default).

A collector that reads the agent at scrape time, so the agent's loop does nothing extra
for metrics: its counters (:attr:`edge_client.agent.EdgeAgent.counters`) become
``fedmq_edge_<counter>_total`` counters and its link and durable state three gauges. It
lives in a :class:`prometheus_client.CollectorRegistry` of the agent's own (agents as
threads of one process, as in the simulator, keep their numbers apart).

=============================================== ==========================================
metric                                          meaning
=============================================== ==========================================
``fedmq_edge_rounds_trained_total``             rounds this run trained for
``fedmq_edge_updates_sent_total``               client updates published (resends apart)
``fedmq_edge_accepted_total``                   updates the coordinator accepted
``fedmq_edge_rejected_total``                   updates the coordinator rejected
``fedmq_edge_rolled_back_total``                updates put back into the residual
``fedmq_edge_resends_total``                    whole updates published again (no receipt)
``fedmq_edge_repairs_total``                    chunk repair requests answered
``fedmq_edge_bad_messages_total``               malformed messages ignored
``fedmq_edge_late_tasks_total``                 tasks received after their deadline
``fedmq_edge_duplicate_id_total``               reports and back-offs: another agent seems
                                                to use this device id (edge_client.duplicate)
``fedmq_edge_connected``                        1 while the link to the broker is up
``fedmq_edge_last_round``                       last round this device finished (-1: none)
``fedmq_edge_update_in_flight``                 1 while a sent update awaits its receipt
=============================================== ==========================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedmq.metrics_http import MetricsServer, serve_metrics

#: Agent counter -> help text; each is exported from the start, at 0.
COUNTERS = {
    "rounds_trained": "Rounds this run trained for.",
    "updates_sent": "Client updates published (resends not counted).",
    "accepted": "Client updates the coordinator accepted.",
    "rejected": "Client updates the coordinator rejected.",
    "rolled_back": "Client updates put back into the residual (rejected, superseded or no receipt).",
    "resends": "Whole client updates published again for want of a receipt.",
    "repairs": "Chunk repair requests answered.",
    "bad_messages": "Malformed messages ignored.",
    "late_tasks": "Tasks received after their round's deadline.",
    "duplicate_id": "Reports and back-offs because another agent seems to use this device id.",
}


class AgentCollector(Collector):
    """Reads an agent's counters and state when scraped.

    Args:
        counters: the agent's counters (read with one atomic dict copy per scrape).
        connected, last_round, in_flight: read the link and the durable state.
    """

    def __init__(self, counters: Mapping[str, int], connected: Callable[[], bool], last_round: Callable[[], int],
                 in_flight: Callable[[], bool]) -> None:
        self._counters = counters
        self._connected = connected
        self._last_round = last_round
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        values = dict(self._counters)
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"fedmq_edge_{name}", text, value=values.get(name, 0))
        yield GaugeMetricFamily("fedmq_edge_connected", "1 while the link to the broker is up.",
                                value=1 if self._connected() else 0)
        yield GaugeMetricFamily("fedmq_edge_last_round", "Last round this device finished (-1: none yet).",
                                value=self._last_round())
        yield GaugeMetricFamily("fedmq_edge_update_in_flight", "1 while a sent update awaits its receipt.",
                                value=1 if self._in_flight() else 0)


def serve_agent_metrics(collector: AgentCollector, address: str, port: int) -> MetricsServer:
    """Serve ``collector`` from a registry of its own on ``address:port``.

    Raises:
        ConfigError: the address cannot be bound (names ``metrics_port``).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return serve_metrics(registry, address, port, "metrics_port")
