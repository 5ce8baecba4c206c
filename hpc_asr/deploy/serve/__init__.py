"""The recognition service over an export directory: ``hpc-asr serve --model-dir DIR``.

Modules, in the order a request meets them: ``limits`` (the one-line 4xx reasons), ``audio``
(request bytes -> samples at the model's rate), ``backend`` (Recognizer + ONNX provider + word
times), ``batching`` (concurrent requests -> one padded ONNX run), ``stream`` (WebSocket sessions:
partial and final transcripts; re-decoding), ``chunked`` (the streaming export's session: each chunk
fed once, caches carried), ``metrics`` (Prometheus), ``page`` (the browser page), ``app``
(routes), ``cli`` (``main``: config, uvicorn, graceful SIGTERM).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``hpc-asr serve``: imported lazily so ``hpc-asr --help`` never loads the web stack."""
    from hpc_asr.deploy.serve.cli import main as _main

    return _main(argv)
