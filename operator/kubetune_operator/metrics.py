"""Prometheus metrics (prometheus_client), served on KUBETUNE_METRICS_PORT at /metrics."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_api.reasons import Phase


class PhaseTracker(Collector):
    """``kubetune_finetunejobs{phase}``: FineTuneJobs by phase, as last reconciled by this replica."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            tally = Tally(self._phases.values())
        return {str(phase): tally.get(phase, 0) for phase in Phase}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("kubetune_finetunejobs", "FineTuneJobs by phase.", labels=["phase"])
        for phase, count in self.counts().items():
            family.add_metric([phase], count)
        yield family


@dataclass
class Metrics:
    """The operator's metrics, in their own registry (so tests and replicas never collide)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    phases: PhaseTracker = field(default_factory=PhaseTracker)
    reconciles: Any = field(init=False)
    errors: Any = field(init=False)
    skipped: Any = field(init=False)
    duration: Any = field(init=False)
    transitions: Any = field(init=False)

    def __post_init__(self) -> None:
        self.registry.register(self.phases)
        self.reconciles = Counter(
            "kubetune_reconcile", "Reconciliations, by trigger.", ["trigger"], registry=self.registry
        )
        self.errors = Counter(
            "kubetune_reconcile_errors",
            "Reconciliations that raised, by trigger.",
            ["trigger"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "kubetune_reconcile_skipped",
            "Events needing no reconciliation (a sync had already read what they say), by trigger.",
            ["trigger"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time spent in one reconciliation, by trigger.",
            ["trigger"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.transitions = Counter(
            "kubetune_phase_transitions",
            "FineTuneJob phase changes observed, by the phase entered.",
            ["phase"],
            registry=self.registry,
        )
