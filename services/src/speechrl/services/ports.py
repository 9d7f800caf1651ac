"""Default ports of the local stack, one place for servers, the stack launcher and the docs."""

DEFAULT_PORTS: dict[str, int] = {
    "intelligibility": 50051,
    "speaker": 50052,
    "rules": 50053,
    "encoder": 50054,
    "rollout": 50055,
    "token2wav": 50056,
    "gateway": 8000,
    "trainer": 8100,
}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
