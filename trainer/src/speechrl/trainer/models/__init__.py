"""The policy families a job trains, with their checkpoint formats: the LLM-ASR (asr_policy.py), the
LLM-TTS (tts_policy.py), and Token2Reward as DiffRO's reward (token2reward.py)."""
