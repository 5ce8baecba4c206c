"""What a client can get wrong, as one exception: an HTTP status, a short kind (the label of the
``errors`` metric) and a one-line reason. The limits themselves are ``ServeConfig`` fields
(hpc_asr.config); a WebSocket closes with code 4000 + status (4408 idle, 4413 too long, ...)."""

from __future__ import annotations

__all__ = ["Rejected", "too_long"]


class Rejected(Exception):
    """A request the service refuses; the service itself keeps serving."""

    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason

    @property
    def close_code(self) -> int:
        """The WebSocket close code (RFC 6455 leaves 4000-4999 to applications)."""
        return 4000 + self.status

    def body(self) -> dict:
        return {"error": self.reason, "kind": self.kind, "status": self.status}


def too_long(seconds: float, limit: float) -> Rejected:
    return Rejected(413, "audio_too_long", f"audio of {seconds:.1f} s exceeds serve.max_audio_s={limit:g}")
