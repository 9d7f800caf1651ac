"""CosyVoice2ForCausalLM in vLLM: vLLM's Qwen2ForCausalLM with the biased head of services/cosyvoice2.py.

vLLM builds a model from its config's architecture name, so a converted CosyVoice2 folder needs that
name registered in every process vLLM starts (its engine core runs in a process of its own). vLLM
runs the plugins of the entry-point group `vllm.general_plugins` in each of them; services'
pyproject.toml names `register`. The class is built on first access (a module `__getattr__`):
this module is imported where vLLM is not installed too (the test suite's doctest collection).
"""

from __future__ import annotations

import functools
from typing import Any

from speechrl.services.cosyvoice2 import ARCHITECTURE


def register() -> None:
    """Register CosyVoice2ForCausalLM with vLLM's model registry, lazily (by module path)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{ARCHITECTURE}")


@functools.cache
def _model_class() -> type:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.utils import maybe_prefix

    class CosyVoice2ForCausalLM(Qwen2ForCausalLM):  # type: ignore[misc, valid-type]
        """Qwen2 whose lm_head has a bias, added to the logits (CosyVoice2's llm_decoder rows carry one)."""

        def __init__(self, *, vllm_config: Any, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = vllm_config.model_config.hf_config.get_text_config()
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True,
                                          quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head"))

        def compute_logits(self, hidden_states: Any) -> Any:
            return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)

    return CosyVoice2ForCausalLM


def __getattr__(name: str) -> Any:
    if name == ARCHITECTURE:
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
