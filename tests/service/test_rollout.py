"""The rollout generator on loopback with the transformers backend and a tiny random Qwen2.

Covers the three prompt forms, seeds, greedy, speech-token mode, max_tokens and stop strings,
weight updates (FULL and LoRA) with versions, per-item and request errors, and status.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from speechrl.client.codec import numpy_to_tensor, tensor_to_numpy
from speechrl.services.ports import free_port
from speechrl.services.rollout.backends.sampling import RowParams, sample, top_k_top_p
from speechrl.services.rollout.server import RolloutConfig, start
from speechrl.services.rollout.tiny import build_tiny_qwen2, first_speech_id
from speechrl.v1 import common_pb2, common_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from tests.support.servers import serve_in_thread

SPEECH_TOKENS = 32
GREEDY = rollout_pb2.SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), speech_tokens=SPEECH_TOKENS))


def _serve(model_dir: Path) -> Iterator[grpc.Channel]:
    # One intra-op thread: on a 2-core box shared with other tests, OpenMP's spinning threads make
    # tiny matmuls 100x slower.
    config = RolloutConfig(port=free_port(), model_path=str(model_dir), threads=1, max_request_items=16,
                           max_samples_per_prompt=8, max_wait_ms=2)
    with serve_in_thread(lambda: start(config)) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel


@pytest.fixture(scope="module")
def channel(model_dir: Path) -> Iterator[grpc.Channel]:
    """A server whose weights no test changes."""
    yield from _serve(model_dir)


@pytest.fixture
def stub(channel: grpc.Channel) -> rollout_pb2_grpc.RolloutGeneratorStub:
    return rollout_pb2_grpc.RolloutGeneratorStub(channel)


@pytest.fixture(scope="module")
def updated(model_dir: Path) -> Iterator[rollout_pb2_grpc.RolloutGeneratorStub]:
    """A server for the weight-update tests, which run in file order."""
    for channel in _serve(model_dir):
        yield rollout_pb2_grpc.RolloutGeneratorStub(channel)


def text(value: str) -> rollout_pb2.Prompt:
    return rollout_pb2.Prompt(text=value)


def ids(values: list[int]) -> rollout_pb2.Prompt:
    return rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=values))


def embeds(array: np.ndarray, suffix: list[int] | None = None) -> rollout_pb2.Prompt:
    return rollout_pb2.Prompt(embeddings=numpy_to_tensor(array), suffix_token_ids=rollout_pb2.TokenIds(ids=suffix or []))


def generate(stub: rollout_pb2_grpc.RolloutGeneratorStub, prompts: list[rollout_pb2.Prompt],
             sampling: rollout_pb2.SamplingParams = GREEDY, **fields) -> rollout_pb2.GenerateResponse:
    return stub.Generate(rollout_pb2.GenerateRequest(prompts=prompts, sampling=sampling, **fields), timeout=120)


def token_lists(reply: rollout_pb2.GenerateResponse) -> list[list[list[int]]]:
    return [[list(s.token_ids) for s in r.samples] for r in reply.results]


def embedding_table(model_dir: Path) -> np.ndarray:
    return load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"].numpy()  # [V, D]


def test_text_token_and_embedding_prompts_give_n_samples_with_logprobs(
        stub: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path) -> None:
    table = embedding_table(model_dir)
    sampling = rollout_pb2.SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7)
    reply = generate(stub, [text("the cat sat on the mat"), ids([5, 6, 7, 8]), embeds(table[[9, 10, 11]], [12, 13])],
                     sampling)
    assert len(reply.results) == 3
    for index, result in enumerate(reply.results):
        assert not result.HasField("error")
        assert len(result.samples) == 3
        for sample_ in result.samples:
            logprobs = tensor_to_numpy(sample_.logprobs)
            assert sample_.prompt_index == index
            assert logprobs.dtype == np.float32 and logprobs.shape == (len(sample_.token_ids),)
            assert np.isfinite(logprobs).all() and (logprobs <= 0).all()
            assert sample_.finish_reason in (rollout_pb2.FINISH_REASON_STOP, rollout_pb2.FINISH_REASON_LENGTH)
            assert (sample_.finish_reason == rollout_pb2.FINISH_REASON_LENGTH) == (len(sample_.token_ids) == 10)
            assert sample_.policy_version == 0


def test_embedding_prompt_equals_its_token_prompt(stub: rollout_pb2_grpc.RolloutGeneratorStub,
                                                  model_dir: Path) -> None:
    table = embedding_table(model_dir)
    prompt_ids = [20, 21, 22, 23, 24]
    reply = generate(stub, [ids(prompt_ids), embeds(table[prompt_ids]), embeds(table[prompt_ids[:2]], prompt_ids[2:])])
    first, *others = token_lists(reply)
    assert all(other == first for other in others)


def test_seeds_reproduce_and_differ(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    def run(seed: int) -> list[list[list[int]]]:
        sampling = rollout_pb2.SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=seed)
        return token_lists(generate(stub, [text("hello world"), text("good morning")], sampling))

    first = run(1)
    assert run(1) == first
    assert run(2) != first
    assert len({tuple(s) for s in first[0]}) > 1  # the n samples of a prompt differ from each other


def test_greedy_is_deterministic(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    sampling = rollout_pb2.SamplingParams(n=3, temperature=0.0, max_tokens=12)
    first = token_lists(generate(stub, [text("the cat sat")], sampling))
    assert first == token_lists(generate(stub, [text("the cat sat")], sampling))
    assert first[0][0] == first[0][1] == first[0][2]


def test_speech_token_mode_only_yields_the_range(stub: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path) -> None:
    begin = first_speech_id(model_dir)
    speech = rollout_pb2.TokenIdRange(begin=begin, end=begin + SPEECH_TOKENS)
    sampling = rollout_pb2.SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=3)
    reply = generate(stub, [text("say hello"), ids([begin, begin + 1])], sampling,
                     mode=rollout_pb2.GENERATION_MODE_SPEECH_TOKENS, speech_token_range=speech)
    generated = [t for result in reply.results for s in result.samples for t in s.token_ids]
    assert generated and all(begin <= t < begin + SPEECH_TOKENS for t in generated)
    assert all(s.text == "" for result in reply.results for s in result.samples)


def test_max_tokens_ends_with_length(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    reply = generate(stub, [text("the cat sat")], rollout_pb2.SamplingParams(temperature=0.0, max_tokens=3))
    [sample_] = reply.results[0].samples
    assert len(sample_.token_ids) == 3 and sample_.finish_reason == rollout_pb2.FINISH_REASON_LENGTH


def test_stop_string_cuts_the_text(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    full = generate(stub, [text("the cat sat")], rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16))
    whole = full.results[0].samples[0]
    assert len(whole.text) > 6
    stop = whole.text[4:6]  # two characters in the middle; the text before them is what must remain
    sampling = rollout_pb2.SamplingParams(temperature=0.0, max_tokens=16, stop=[stop, "never-appears"])
    [cut] = generate(stub, [text("the cat sat")], sampling).results[0].samples
    assert cut.finish_reason == rollout_pb2.FINISH_REASON_STOP
    assert cut.text == whole.text[:whole.text.index(stop)]
    assert list(cut.token_ids) == list(whole.token_ids[:len(cut.token_ids)])  # a prefix: ids up to the stop
    assert len(tensor_to_numpy(cut.logprobs)) == len(cut.token_ids)


def test_bad_items_fail_alone(stub: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path) -> None:
    table = embedding_table(model_dir)
    broken = common_pb2.Tensor(data=b"\x00" * 10, dtype=common_pb2.DTYPE_FLOAT32, shape=[3, table.shape[1]])
    reply = generate(stub, [
        text("fine"),
        rollout_pb2.Prompt(embeddings=broken),
        embeds(np.zeros((3, table.shape[1] + 1), np.float32)),
        ids([1, 10**6]),
        text("   "),
        rollout_pb2.Prompt(),
        embeds(np.full((2, table.shape[1]), np.nan, np.float32)),
    ])
    assert reply.results[0].samples and not reply.results[0].HasField("error")
    expected = [(1, common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR, "prompts[1].embeddings", "needs"),
                (2, common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR, "prompts[2].embeddings", "hidden size"),
                (3, common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR, "prompts[3].token_ids.ids", "vocabulary"),
                (4, common_pb2.ITEM_ERROR_CODE_EMPTY_TEXT, "prompts[4].content", "empty"),
                (5, common_pb2.ITEM_ERROR_CODE_EMPTY_TEXT, "prompts[5].content", "empty"),
                (6, common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR, "prompts[6].embeddings", "NaN")]
    for index, code, field, words in expected:
        result = reply.results[index]
        assert not result.samples
        assert (result.error.code, result.error.field) == (code, field)
        assert words in result.error.message


def test_too_long_prompt_fails_alone(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    reply = generate(stub, [ids([5] * 600), text("fine")])
    assert reply.results[0].error.code == common_pb2.ITEM_ERROR_CODE_TEXT_TOO_LONG
    assert reply.results[1].samples


@pytest.mark.parametrize("request_, field", [
    (rollout_pb2.GenerateRequest(sampling=GREEDY), "prompts"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")]), "sampling"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=rollout_pb2.SamplingParams(max_tokens=0)),
     "sampling.max_tokens"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=rollout_pb2.SamplingParams(max_tokens=4, n=9)),
     "sampling.n"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=rollout_pb2.SamplingParams(max_tokens=4,
                                                                                          temperature=-1)),
     "sampling.temperature"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=rollout_pb2.SamplingParams(max_tokens=4, top_p=1.5)),
     "sampling.top_p"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=GREEDY, mode=rollout_pb2.GENERATION_MODE_SPEECH_TOKENS),
     "speech_token_range"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")], sampling=GREEDY, mode=rollout_pb2.GENERATION_MODE_SPEECH_TOKENS,
                                 speech_token_range=rollout_pb2.TokenIdRange(begin=5, end=10**6)),
     "speech_token_range"),
    (rollout_pb2.GenerateRequest(prompts=[text("a")] * 17, sampling=GREEDY), "prompts"),
])
def test_malformed_requests_are_invalid_argument_naming_the_field(
        stub: rollout_pb2_grpc.RolloutGeneratorStub, request_: rollout_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value.details()).startswith(field)
    assert generate(stub, [text("still answering")]).results[0].samples


def test_concurrent_requests_each_get_their_own_results(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> None:
    prompts = [[text("the cat")], [text("hello"), ids([3, 4])], [text("good morning")] * 3]
    sampling = rollout_pb2.SamplingParams(n=2, temperature=0.0, max_tokens=6)
    alone = [token_lists(generate(stub, p, sampling)) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda p: token_lists(generate(stub, p, sampling)), prompts))
    assert together == alone


def test_health_and_status(channel: grpc.Channel, model_dir: Path) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="speechrl.v1.RolloutGenerator"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert (status.service, status.backend, status.model) == ("speechrl.v1.RolloutGenerator", "transformers",
                                                              str(model_dir))
    assert status.residency == "resident" and status.device == "cpu" and status.items_processed > 0


# -- weight updates (the `updated` server; these tests run in order) ------------------------------

def update(stub: rollout_pb2_grpc.RolloutGeneratorStub, version: int, path: Path | str,
           weights_format: rollout_pb2.WeightsFormat = rollout_pb2.WEIGHTS_FORMAT_FULL) -> rollout_pb2.UpdateWeightsResponse:
    return stub.UpdateWeights(rollout_pb2.UpdateWeightsRequest(version=version, path=str(path), format=weights_format),
                              timeout=120)


def greedy(stub: rollout_pb2_grpc.RolloutGeneratorStub) -> tuple[list[int], int]:
    [sample_] = generate(stub, [text("the cat sat on the mat")]).results[0].samples
    return list(sample_.token_ids), sample_.policy_version


def test_full_update_changes_greedy_output_and_version(updated: rollout_pb2_grpc.RolloutGeneratorStub,
                                                       model_dir: Path, tmp_path: Path) -> None:
    before, version = greedy(updated)
    assert version == 0
    state = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    changed = {"lm_head.weight": state["lm_head.weight"] + torch.randn(state["lm_head.weight"].shape, generator=generator)}
    save_file(changed, str(tmp_path / "step1.safetensors"))  # a partial state dict: only the head changes
    assert update(updated, 1, tmp_path / "step1.safetensors").version == 1
    after, version = greedy(updated)
    assert after != before and version == 1


@pytest.mark.parametrize("version, field", [(1, "version"), (0, "version"), (-3, "version")])
def test_versions_must_increase(updated: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path,
                                version: int, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        update(updated, version, model_dir / "model.safetensors")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value.details()).startswith(field) and "not greater than the current policy version 1" in str(info.value.details())


def test_bad_weights_are_refused_and_change_nothing(updated: rollout_pb2_grpc.RolloutGeneratorStub,
                                                    model_dir: Path, tmp_path: Path) -> None:
    before = greedy(updated)
    state = load_file(str(model_dir / "model.safetensors"))
    save_file({"lm_head.weight": state["lm_head.weight"] * 0, "model.not_a_layer.weight": torch.zeros(2)},
              str(tmp_path / "unknown.safetensors"))
    save_file({"lm_head.weight": torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    cases = [(tmp_path / "missing.safetensors", "does not exist", rollout_pb2.WEIGHTS_FORMAT_FULL),
             (tmp_path / "unknown.safetensors", "model.not_a_layer.weight", rollout_pb2.WEIGHTS_FORMAT_FULL),
             (tmp_path / "shape.safetensors", "lm_head.weight [3, 3]", rollout_pb2.WEIGHTS_FORMAT_FULL),
             (tmp_path / "junk.safetensors", "not a readable safetensors", rollout_pb2.WEIGHTS_FORMAT_FULL),
             (tmp_path, "not a PEFT adapter folder", rollout_pb2.WEIGHTS_FORMAT_LORA),
             (tmp_path, "WEIGHTS_FORMAT_FULL or", rollout_pb2.WEIGHTS_FORMAT_UNSPECIFIED)]
    for path, words, weights_format in cases:
        with pytest.raises(grpc.RpcError) as info:
            update(updated, 2, path, weights_format)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = str(info.value.details())
        assert details.startswith("format" if weights_format == rollout_pb2.WEIGHTS_FORMAT_UNSPECIFIED else "path")
        assert words in details, details
    assert greedy(updated) == before  # still version 1, same weights


def test_lora_update_applies_the_adapter(updated: rollout_pb2_grpc.RolloutGeneratorStub, model_dir: Path,
                                         tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    before, _ = greedy(updated)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # init_lora_weights=False draws B as well as A, so the adapter changes the outputs at once.
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    assert update(updated, 2, tmp_path / "adapter", rollout_pb2.WEIGHTS_FORMAT_LORA).version == 2
    with_adapter, version = greedy(updated)
    assert with_adapter != before and version == 2
    # A second adapter replaces the first rather than stacking on it; a FULL update drops it.
    assert update(updated, 3, tmp_path / "adapter", rollout_pb2.WEIGHTS_FORMAT_LORA).version == 3
    assert greedy(updated) == (with_adapter, 3)
    save_file({"lm_head.weight": load_file(str(model_dir / "model.safetensors"))["lm_head.weight"]},
              str(tmp_path / "head.safetensors"))
    assert update(updated, 4, tmp_path / "head.safetensors").version == 4
    restored, version = greedy(updated)
    assert version == 4 and restored != with_adapter


# -- sampling math on hand-built logits -----------------------------------------------------------

def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    kept = top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.65]))
    assert torch.isfinite(kept).tolist() == [[False, False, True, True], [False, False, True, True]]


def test_sampled_logprobs_are_those_of_the_processed_distribution() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3))
    rows = RowParams.build([1.0, 2.0, 1.0], [0, 0, 1], [1.0, 1.0, 1.0], [None, None, [0, 1]], 4, "cpu")
    ids, logprobs = sample(logits, rows, [torch.Generator().manual_seed(i) for i in range(3)])
    expected0 = float(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[ids[0]])
    tempered = (logits[1] / 2).log_softmax(-1)
    assert logprobs[0].item() == pytest.approx(expected0, abs=1e-6)
    assert logprobs[1].item() == pytest.approx(float(tempered[ids[1]]), abs=1e-6)
    assert (ids[2].item(), logprobs[2].item()) == (1, pytest.approx(0.0))  # top-1 of the allowed {0, 1}


def test_tiny_default_model_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speechrl.services.rollout.server import resolve_model_path

    monkeypatch.setenv("SPEECHRL_HOME", str(tmp_path))
    folder = Path(resolve_model_path("tiny"))
    assert folder == tmp_path / "models" / "tiny-qwen2" and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny") == str(folder) and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_path("/models/qwen") == "/models/qwen"


def test_a_push_under_a_stale_fence_is_refused_and_changes_nothing(model_dir: Path, tmp_path: Path) -> None:
    """A trainer whose lease lapsed (fence 7) comes back after a newer holder pushed (fence 9): refused,
    with both fences named, and the newer policy keeps sampling."""
    import asyncio

    from speechrl.client import AsyncRolloutClient, StaleFenceError

    state = load_file(str(model_dir / "model.safetensors"))
    save_file({"lm_head.weight": state["lm_head.weight"] * 2}, str(tmp_path / "newer.safetensors"))
    save_file({"lm_head.weight": state["lm_head.weight"] * 0}, str(tmp_path / "stale.safetensors"))
    for channel in _serve(model_dir):
        stub = rollout_pb2_grpc.RolloutGeneratorStub(channel)
        endpoint = channel._channel.target().decode()  # type: ignore[attr-defined]

        async def push(version: int, name: str, fence: int, endpoint: str = endpoint) -> int:
            async with AsyncRolloutClient(endpoint) as rollout:
                return await rollout.update_weights(version, str(tmp_path / name), fence=fence)

        assert asyncio.run(push(1, "newer.safetensors", 9)) == 1
        newer = greedy(stub)
        with pytest.raises(StaleFenceError) as info:
            asyncio.run(push(2, "stale.safetensors", 7))
        error = info.value
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.error_code == "STALE_FENCE"
        assert (error.fence, error.accepted_fence) == (7, 9)
        assert "stale fencing token 7" in error.details and "carried 9" in error.details
        assert greedy(stub) == newer  # same tokens, still version 1
        assert asyncio.run(push(2, "newer.safetensors", 0)) == 2  # a pusher without a lease is not fenced
