"""Backend registries whose entries import their module only when that backend is chosen.

A server loads the dependencies of the backend it runs and no other's: a faster-whisper scorer never
imports torch, a transformers rollout never imports vLLM (which lives in its own venv), an espeak
token2wav never imports CosyVoice. So each registry names its classes by module and name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImportedOnUse:
    """A backend factory: imports `module` on the first call and builds `module.name` with the arguments."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)
