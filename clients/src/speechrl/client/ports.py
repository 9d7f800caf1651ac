"""Default ports of the SpeechRL services: the one table clients, servers, the local stack and
the deployment files agree on."""

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
