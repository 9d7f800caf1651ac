"""Audio-encoder service: the frozen Whisper encoder + adaptor front-end of an LLM-ASR model."""
