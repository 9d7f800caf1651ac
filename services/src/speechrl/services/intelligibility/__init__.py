"""Intelligibility scorer: Whisper transcribes each utterance; WER/CER against its reference is the reward."""
