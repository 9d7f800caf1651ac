"""SpeechRL services: gRPC scorers, encoder, rollout generator, gateway and the GPU lease."""

__version__ = "0.1.0"
