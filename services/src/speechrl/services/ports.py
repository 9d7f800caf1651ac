"""Default ports of the local stack, one place for servers, the stack launcher and the docs."""

DEFAULT_PORTS: dict[str, int] = {
    "intelligibility": 50051,
    "speaker": 50052,
    "rules": 50053,
    "encoder": 50054,
    "rollout": 50055,
    "gateway": 8000,
    "trainer": 8100,
}
