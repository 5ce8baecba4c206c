"""The service's Prometheus metrics, in a registry of their own (one per app, so tests and two
apps in one process do not collide). ``GET /metrics`` renders them in the text format.

- ``hpc_asr_requests_total{endpoint, code}``: answered requests and closed streams
- ``hpc_asr_errors_total{kind}``: refusals and failures by kind (``limits.Rejected.kind``, ``internal``)
- ``hpc_asr_request_seconds{endpoint}``: latency, request received -> transcript sent
- ``hpc_asr_rtf``: processing seconds / audio seconds per offline request
- ``hpc_asr_active_streams``: open WebSocket streams
- ``hpc_asr_batch_size``: items per model run
- ``hpc_asr_audio_seconds_total``: audio recognised
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RTF = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hpc_asr_requests", "Answered requests and closed streams", ["endpoint", "code"],
                                registry=r)
        self.errors = Counter("hpc_asr_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("hpc_asr_request_seconds", "Request received -> transcript sent", ["endpoint"],
                                 buckets=_LATENCY, registry=r)
        self.rtf = Histogram("hpc_asr_rtf", "Processing time / audio duration (offline requests)", buckets=_RTF,
                             registry=r)
        self.active_streams = Gauge("hpc_asr_active_streams", "Open WebSocket streams", registry=r)
        self.batch_size = Histogram("hpc_asr_batch_size", "Items per model run", buckets=_BATCH, registry=r)
        self.audio_seconds = Counter("hpc_asr_audio_seconds", "Audio recognised, seconds", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
