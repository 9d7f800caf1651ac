"""Default ports (defined in the client package, re-exported for the servers) and free ports for tests."""

from speechrl.client.ports import DEFAULT_PORTS

__all__ = ["DEFAULT_PORTS", "free_port"]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
