"""The systems compared with this proxy, and the bare gRPC drain (the upstream limit)."""
