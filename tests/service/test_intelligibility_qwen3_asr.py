"""The qwen3-asr intelligibility backend on a tiny random Qwen3-ASR checkpoint in transformers' own format
(tests/support/speech_llm.py builds it from the config classes and saves it with save_pretrained; it is
loaded by path, no hub). Random weights transcribe garbage, so the server's transcripts are checked
against the library's own `generate` on the same audio and prompt, one clip at a time, not against the
references; the parsing of Qwen3-ASR's "language X<asr_text>" header is checked on hand-made strings."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer
from transformers.models.qwen3_asr.modeling_qwen3_asr import _get_feat_extract_output_lengths

from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.config import parse_config
from speechrl.services.intelligibility.backends import BackendOptions, load_backend, max_new_tokens
from speechrl.services.intelligibility.backends.qwen3_asr import parse_transcript
from speechrl.services.intelligibility.server import IntelligibilityConfig, start
from speechrl.services.ports import free_port
from speechrl.services.speech_llm import ASR_PROMPTS, prompt_ids_around_audio
from speechrl.v1 import common_pb2, common_pb2_grpc, intelligibility_pb2, intelligibility_pb2_grpc
from tests.support.servers import Speech, serve_in_thread
from tests.support.speech_llm import build_qwen3_asr, library_greedy

pb = intelligibility_pb2
THREADS = 1  # the tiny model's ops are too small to split over threads (see test_intelligibility_backends.py)
RATE = 16_000
# The names Qwen3-ASR was trained with after "language " (its model card's list), written out here rather
# than taken from the backend, so that a wrong language in the served prompt shows.
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German"}


@pytest.fixture(scope="module", autouse=True)
def torch_threads() -> Iterator[None]:
    # The backend sets torch's process-wide thread count; give later test modules theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_asr(tmp_path_factory.mktemp("qwen3-asr"))


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(RATE * seconds))).astype(np.float32)


def pcm(clip: np.ndarray) -> common_pb2.Audio:
    """16 kHz float32 PCM, so the server decodes exactly these samples."""
    return common_pb2.Audio(
        pcm=common_pb2.RawPcm(data=clip.astype("<f4").tobytes(), sample_rate_hertz=RATE, encoding=common_pb2.PCM_F32LE)
    )


def library_transcript(folder: Path, clip: np.ndarray, language: str, new_tokens: int) -> str:
    """The library model's greedy answer for one clip (its own generate), prompted as Qwen3-ASR is with the
    language forced, decoded as text."""
    prompt = ASR_PROMPTS["qwen3_asr"].replace(
        "language English<asr_text>", f"language {LANGUAGE_NAMES[language]}<asr_text>"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prefix, suffix = prompt_ids_around_audio(prompt, tokenizer)
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    frames = extractor([clip], sampling_rate=RATE, return_attention_mask=True, padding=True, return_tensors="pt")[
        "attention_mask"
    ].sum(-1)  # [1]
    # The library's forward refuses a placeholder count that differs from its tower's output.
    count = int(
        _get_feat_extract_output_lengths(frames, AutoConfig.from_pretrained(str(folder)).audio_config.n_window)[0]
    )
    tokens = library_greedy(folder, clip, list(prefix), count, list(suffix), new_tokens)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "raw, parsed",
    [
        ("language English<asr_text>Hello there.", ("English", "Hello there.")),
        ("language Chinese<asr_text>你好，世界。", ("Chinese", "你好，世界。")),
        ("language German\n<asr_text> Guten Tag ", ("German", "Guten Tag")),
        ("language None<asr_text>", (None, "")),  # the model's answer for no speech
        (" The cat sat. ", (None, "The cat sat.")),  # the forced-language answer: all transcript
        ("language models are fun", (None, "language models are fun")),  # no marker: a word, not a header
        ("", (None, "")),
    ],
)
def test_the_language_header_is_parsed_out_of_the_answer(raw: str, parsed: tuple[str | None, str]) -> None:
    assert parse_transcript(raw) == parsed


def test_server_scores_a_batch_in_order_as_the_library_transcribes_each_clip(checkpoint: Path, speech: Speech) -> None:
    config = parse_config(
        IntelligibilityConfig,
        "intelligibility",
        [
            "--backend",
            "qwen3-asr",
            "--model-path",
            str(checkpoint),
            "--port",
            str(free_port()),
            "--max-audio-seconds",
            "5",
            "--threads",
            str(THREADS),
        ],
    )
    wav = speech.wav("Hello there.", "en-us")
    spoken = decode_audio(AudioInput(encoded=wav), RATE, 5.0)  # the samples the server will transcribe
    short, long = noise(0.3, 1), noise(2.0, 2)  # under the extractor's 0.5 s minimum; the batch's longest
    # (audio, clip the model sees or None, reference, language): the same clip in two languages shows that
    # each item's language reaches its prompt; a junk item must not shift its neighbours.
    cases = [
        (pcm(long), long, "你好世界", "zh"),
        (common_pb2.Audio(encoded=b"junk"), None, "hello", "en"),
        (common_pb2.Audio(encoded=wav), spoken, "hello there", "en"),
        (pcm(long), long, "hello world", "en"),
        (pcm(short), short, "guten tag", "de"),
    ]
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(ch)
        reply = stub.ScoreIntelligibility(
            pb.ScoreIntelligibilityRequest(
                items=[
                    pb.IntelligibilityItem(audio=audio, reference_text=reference, language=language)
                    for audio, _, reference, language in cases
                ]
            ),
            timeout=120,
        )
        status = common_pb2_grpc.ServiceStatusStub(ch).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert (status.backend, status.model) == ("qwen3-asr", str(checkpoint))
    assert [r.WhichOneof("outcome") for r in reply.results] == ["score", "error", "score", "score", "score"]
    assert reply.results[1].error.field == "items[1].audio"
    # The server decodes one batch; its token budget follows the batch's longest clip.
    budget = max_new_tokens(max(c.shape[0] for _, c, _, _ in cases if c is not None) / RATE, 10_000)
    served = {i: reply.results[i].score.transcript for i, (_, clip, _, _) in enumerate(cases) if clip is not None}
    expected = {
        i: library_transcript(checkpoint, clip, language, budget)
        for i, (_, clip, _, language) in enumerate(cases)
        if clip is not None
    }
    assert served == expected
    assert len(set(served.values())) == len(served)  # all different, so a mix-up of items could not pass
    for index in served:
        score = reply.results[index].score
        assert all(math.isfinite(x) for x in (score.wer, score.cer, score.reward)) and score.wer >= 0


def test_backend_refuses_checkpoints_it_would_misread(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="needs model_path"):
        load_backend("qwen3-asr", BackendOptions())
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_backend("qwen3-asr", BackendOptions(model_path=str(checkpoint), compute_type="int8"))
    # qwen-asr's own layout (thinker_config, thinker.* weights): transformers would load it as a random model.
    qwen_asr_layout = Path(shutil.copytree(checkpoint, tmp_path / "qwen-asr-layout"))
    config = json.loads((qwen_asr_layout / "config.json").read_text())
    (qwen_asr_layout / "config.json").write_text(json.dumps({**config, "thinker_config": {}}))
    with pytest.raises(ValueError, match="qwen-asr's format"):
        load_backend("qwen3-asr", BackendOptions(model_path=str(qwen_asr_layout), threads=THREADS))
    renamed = Path(shutil.copytree(checkpoint, tmp_path / "renamed"))
    weights = load_file(str(renamed / "model.safetensors"))
    save_file(
        {name.replace("model.language_model.", "thinker.model."): tensor for name, tensor in weights.items()},
        str(renamed / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="weights missing"):
        load_backend("qwen3-asr", BackendOptions(model_path=str(renamed), threads=THREADS))


def test_backend_knows_qwen3_asrs_languages(checkpoint: Path) -> None:
    backend = load_backend("qwen3-asr", BackendOptions(model_path=str(checkpoint), threads=THREADS))
    assert (backend.name, backend.sample_rate) == ("qwen3-asr", RATE)
    assert {"en", "zh", "yue", "de", "ja", "fil"} <= backend.languages and len(backend.languages) == 30
