"""``hpc-asr serve --model-dir DIR [--host H --port P] [--config FILE] [--serve.key v --decode.key v]``

Runs the service under uvicorn. SIGTERM (or Ctrl-C) drains: ``/readyz`` turns 503 and the
listening socket closes at once (new connections are refused), requests in flight finish (up to
``serve.drain_timeout_s``), open WebSocket streams are closed with 1012 (service restart), then the
process exits 0.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from hpc_asr.cli import parse_cli

__all__ = ["main"]


def _extra(p) -> None:
    p.add_argument("--model-dir", required=True, type=Path, help="an export directory (model.onnx + model.json)")
    p.add_argument("--host", help="address to bind (default serve.host: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port: 8000; 0 = any free port)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default warning; the service prints its own start-up lines)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(argv, "the recognition service (HTTP + WebSocket) over an export", _extra)
    if args.host is not None:
        cfg.serve.host = args.host
    if args.port is not None:
        cfg.serve.port = args.port
    for name in ("model.onnx", "model.json"):
        if not (args.model_dir / name).is_file():
            print(f"error: {args.model_dir / name}: not found (an export directory from `hpc-asr export`)",
                  file=sys.stderr)
            return 2
    import uvicorn

    from hpc_asr.deploy.serve.app import create_app

    app = create_app(args.model_dir, cfg)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new work before uvicorn drains
            app.state.service.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"[serve] listening on http://{host}:{port}", flush=True)

    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level=args.log_level,
                            timeout_graceful_shutdown=cfg.serve.drain_timeout_s or None, ws="websockets-sansio",
                            ws_max_size=max(1 << 20, cfg.serve.max_body_bytes), access_log=False)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its drain: a drained
        signal.signal(sig, lambda *_: None)      # service then exits 0, not killed by the signal
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
