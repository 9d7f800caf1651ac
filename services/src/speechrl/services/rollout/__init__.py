"""Rollout generator: the policy LLM sampling n completions per prompt (text, token ids or prompt
embeddings; text or speech tokens), with per-token logprobs, and taking new weights from the trainer."""
