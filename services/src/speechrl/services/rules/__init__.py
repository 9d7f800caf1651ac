"""Rule-reward service: the ASR paper's text-only rewards (R1 accuracy, R2 hallucination, R3 keywords)."""
