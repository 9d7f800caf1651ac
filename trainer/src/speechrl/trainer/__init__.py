"""SpeechRL trainer: GRPO / DiffRO for LLM-based ASR and TTS."""
