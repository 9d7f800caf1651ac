"""token2wav: speech tokens (+ a speaker prompt) -> waveform, served like the other GPU stages (issue 7)."""
