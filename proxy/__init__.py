"""kernel-events-proxy: a gRPC kernel lifecycle stream re-emitted as filtered SSE."""

__version__ = "0.1.0"
