"""transformers backend: any causal-LM checkpoint folder (Qwen2 and kin), or the text decoder of a speech-LLM
checkpoint (Qwen3-ASR, Qwen2-Audio: speechrl.services.speech_llm), sampled with our own loop.

generate() is not used because it draws every row from one global RNG; RL needs a seed per prompt
(GRPO groups are re-sampled for debugging) and the sampled tokens' logprobs. The loop here
prefills all rows of a batch at once (left-padded embeddings, so text, token and embedding prompts
share one path), then decodes one token per step with a KV cache until every row has hit EOS, a
stop string or its max_tokens.

UpdateWeights: FULL copies the named tensors into the live parameters (names and shapes checked
first, so a bad file changes nothing). LORA applies the PEFT adapter unmerged (peft's LoRA layers
injected into the model, the base weights untouched), so each new adapter simply replaces the last
one; merging would need the old delta subtracted again, with rounding drift over many updates.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache

from speechrl.services.cosyvoice2 import load_causal_lm
from speechrl.services.errors import RequestInvalid
from speechrl.services.residency import TorchResidency
from speechrl.services.rollout.backends import (
    BackendOptions,
    Completion,
    GenerationRequest,
    check_full_update,
    check_lora_folder,
    eos_ids,
    safetensors_files,
)
from speechrl.services.rollout.backends.sampling import RowParams, sample
from speechrl.services.speech_llm import is_speech_llm, load_decoder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# "auto": full precision on CPU (half-precision matmuls are slow there, and RL wants exact
# logprobs); bfloat16 on GPU, the precision Qwen2 was trained in.
AUTO_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


class _Row:
    """The growing completion of one row (one sample of one prompt)."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish: str | None = None
        self.text: str | None = None  # set when a stop string cut it


class TransformersBackend:
    """Batched sampling with a transformers AutoModelForCausalLM.

    >>> backend = TransformersBackend(BackendOptions(model_path="/models/qwen2-0.5b", device="cuda:0"))  # doctest: +SKIP
    >>> backend.generate([GenerationRequest((1, 2, 3), Sampling(max_tokens=8))])  # doctest: +SKIP
    """

    name = "transformers"

    def __init__(self, options: BackendOptions):
        if not Path(options.model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path must be a causal-LM checkpoint folder with config.json "
                                    f"(save_pretrained output), got {options.model_path!r}")
        dtype_name = AUTO_DTYPES[options.device.split(":")[0]] if options.dtype == "auto" else options.dtype
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {options.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        if options.device.startswith("cpu"):
            # One intra-op pool sized to the cores: the batcher calls from a single thread.
            torch.set_num_threads(options.threads or os.cpu_count() or 1)
        self.model = options.model_path
        self.device = torch.device(options.device)
        self.dtype = DTYPES[dtype_name]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        # sdpa handles left padding and the cache; "eager" would materialise [R, H, T, T] masks.
        model: Any = load_decoder(self.model, self.dtype, attn_implementation="sdpa") if is_speech_llm(self.model) \
            else load_causal_lm(self.model, self.dtype, attn_implementation="sdpa")
        self._base: Any = model.to(self.device).eval()
        # transformers 5.24 renamed forward's past_key_values to cache; vLLM's venv pins 5.19.
        forward = inspect.signature(type(self._base).forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        config = self._base.config
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)
        self.max_model_len = options.max_model_len or int(config.max_position_embeddings)
        self.eos_token_ids = eos_ids(self.model, self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else min(self.eos_token_ids))
        # Names and shapes of the plain (adapter-free) model: what a FULL update may name.
        self._shapes = {name: tuple(t.shape) for name, t in self._base.state_dict().items()}
        # peft injects its LoRA layers into self._base in place, so forward passes always call
        # self._base; self._peft is the wrapper that manages the adapters.
        self._peft: Any = None
        self._adapter: str | None = None  # the active adapter's name
        self._residency = TorchResidency(lambda: [self._base], options.device)
        log.info("transformers policy %s on %s (%s), vocab %d, hidden %d", self.model, self.device, dtype_name,
                 self.vocab_size, self.hidden_size)

    # -- sampling -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        rows = [_Row(request) for request in requests for _ in range(request.sampling.n)]
        generators = [self._generator(request, j) for request in requests for j in range(request.sampling.n)]
        params = RowParams.build(
            [r.request.sampling.temperature for r in rows], [r.request.sampling.top_k for r in rows],
            [r.request.sampling.top_p for r in rows],
            [None if r.request.allowed is None else [*r.request.allowed, *self.eos_token_ids] for r in rows],
            self.vocab_size, self.device)
        embeds, mask = self._prefill_inputs(requests)  # [R, L, D], [R, L]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [R, L]: left padding must not shift positions
        cache = DynamicCache(config=self._base.config)
        logits = self._base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1]  # [R, V]
        next_position = positions[:, -1:] + 1  # [R, 1]
        for _ in range(max(r.request.sampling.max_tokens for r in rows)):
            ids, logprobs = sample(logits, params, generators)  # [R], [R]
            if self._advance(rows, ids.tolist(), logprobs.tolist()):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # [R, L + step]
            logits = self._base(input_ids=ids.unsqueeze(1), attention_mask=mask, position_ids=next_position,
                                use_cache=True, **{self._cache_arg: cache}).logits[:, -1]  # [R, V]
            next_position = next_position + 1
        completions = [self._completion(row) for row in rows]
        out, start = [], 0
        for request in requests:
            out.append(completions[start:start + request.sampling.n])
            start += request.sampling.n
        return out

    def _generator(self, request: GenerationRequest, sample_index: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if request.sampling.seed is None:
            generator.seed()  # non-deterministic
        else:
            generator.manual_seed((request.sampling.seed + sample_index) % (2**63))
        return generator

    def _prefill_inputs(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings [R, L, D] and attention mask [R, L], rows repeated n times."""
        table = self._base.get_input_embeddings()
        prompts = []
        for request in requests:
            parts = []
            if request.prefix_ids:
                parts.append(table(torch.tensor(request.prefix_ids, dtype=torch.long, device=self.device)))
            if request.embeds is not None:
                parts.append(torch.tensor(request.embeds, dtype=self.dtype, device=self.device))
            if request.token_ids:
                parts.append(table(torch.tensor(request.token_ids, dtype=torch.long, device=self.device)))
            prompts.extend([torch.cat(parts)] * request.sampling.n)  # each [T_i, D]
        longest = max(p.shape[0] for p in prompts)
        embeds = torch.zeros(len(prompts), longest, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            embeds[row, longest - prompt.shape[0]:] = prompt
            mask[row, longest - prompt.shape[0]:] = 1
        return embeds, mask

    def _advance(self, rows: list[_Row], ids: list[int], logprobs: list[float]) -> bool:
        """Append each live row's new token and settle rows that end; True when all have ended."""
        for row, token, logprob in zip(rows, ids, logprobs, strict=True):
            if row.finish is not None:
                continue
            if token in self.eos_token_ids:
                row.finish = "stop"
                continue
            row.ids.append(token)
            row.logprobs.append(logprob)
            stop = row.request.sampling.stop
            if stop:
                text = self._decode(row.ids)
                cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
                if cuts:
                    row.text, row.finish = text[:min(cuts)], "stop"
                    continue
            if len(row.ids) >= row.request.sampling.max_tokens:
                row.finish = "length"
        return all(row.finish is not None for row in rows)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _completion(self, row: _Row) -> Completion:
        text = row.text if row.text is not None else self._decode(row.ids)
        return Completion(token_ids=row.ids, text=text, logprobs=np.asarray(row.logprobs, dtype=np.float32),
                          finish_reason=row.finish or "length")

    # -- weights --------------------------------------------------------------------------------

    @torch.no_grad()
    def load_full(self, path: Path) -> None:
        from safetensors import safe_open

        files = safetensors_files(path)
        check_full_update(files, self._shapes)
        if self._peft is not None:  # the full weights are the whole policy now
            self._base = self._peft.unload()  # strip the LoRA layers without merging
            self._peft, self._adapter = None, None
        state = self._base.state_dict()
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    state[name].copy_(handle.get_tensor(name))

    def load_lora(self, path: Path, version: int) -> None:
        from peft import PeftModel

        check_lora_folder(path)
        name = f"v{version}"
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
                self._peft.set_adapter(name)
                self._peft.delete_adapter(self._adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise RequestInvalid("path", f"adapter {path} does not fit the model: {exc}") from None
        self._base.to(self.device).eval()
        self._adapter = name

    # -- residency ------------------------------------------------------------------------------

    def load_to_device(self) -> None:
        self._residency.load_to_device()

    def offload(self, mode: str) -> None:
        self._residency.offload(mode)

    def weight_bytes(self) -> int:
        return self._residency.weight_bytes()
