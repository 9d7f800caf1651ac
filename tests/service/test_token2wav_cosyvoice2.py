"""The cosyvoice2 token2wav backend on a tiny random CosyVoice2 folder, through CosyVoice's own classes.

The references are CosyVoice's: CosyVoice2Model.token2wav for rendering, and for the prompt features the
formulas of its zero-shot frontend (cosyvoice/cli/frontend.py), which cannot be imported here because it
imports openai-whisper, so they are written out: torchaudio's Kaldi fbank, the yaml's feat_extractor, and
Whisper's log-mel with librosa's filters (the ones Whisper's mel_filters.npz holds).
"""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.token2wav.backends import BackendOptions, SynthesisItem, Waveform, load_backend
from speechrl.services.token2wav.engine import Token2WavEngine
from speechrl.services.token2wav.random_cosyvoice2 import build_token2wav_folder

TOKENS = [17, 4000, 6560, 0, 321, 321, 321, 99, 1500, 2500, 3500, 4500]


def espeak_wav(text: str, voice: str) -> bytes:
    """espeak-ng's 22050 Hz WAV of text: a prompt speaker at a rate the frontend must resample from."""
    return subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_token2wav_folder(tmp_path_factory.mktemp("cosyvoice2") / "CosyVoice2")


@pytest.fixture(scope="module")
def backend(folder: Path):  # type: ignore[no-untyped-def]
    return load_backend("cosyvoice2", BackendOptions(model_dir=str(folder)))


def frontend_features(backend, wav: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """frontend_zero_shot's flow inputs for a prompt WAV: speech tokens, mel, embedding."""
    import librosa
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional

    samples, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    speech = torch.from_numpy(samples.mean(axis=1))[None]  # load_wav: [1, N]
    at_16k = torchaudio.functional.resample(speech, rate, 16000)
    at_24k = torchaudio.functional.resample(speech, rate, 24000)
    mel = backend.feat_extractor(at_24k).squeeze(0).transpose(0, 1)[None]  # _extract_speech_feat: [1, F, 80]
    # _extract_speech_token: whisper.log_mel_spectrogram(speech, n_mels=128), then the tokenizer.
    stft = torch.stft(at_16k[0], 400, 160, window=torch.hann_window(400), return_complex=True)
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=128))
    log_mel = (filters @ stft[..., :-1].abs() ** 2).clamp(min=1e-10).log10()
    log_mel = (torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0  # [128, frames]
    session = backend.speech_tokenizer
    names = [i.name for i in session.get_inputs()]
    tokens = torch.tensor(session.run(None, {names[0]: log_mel[None].numpy(),
                                             names[1]: np.array([log_mel.shape[1]], dtype=np.int32)})[0], dtype=torch.int32)
    fbank = kaldi.fbank(at_16k, num_mel_bins=80, dither=0, sample_frequency=16000)  # _extract_spk_embedding
    fbank = fbank - fbank.mean(dim=0, keepdim=True)
    embedding = torch.tensor(backend.campplus.run(None, {backend.campplus.get_inputs()[0].name: fbank[None].numpy()})[0])
    count = min(mel.shape[1] // 2, tokens.shape[1])  # frontend_zero_shot: speech_feat % speech_token = 2
    return tokens[:, :count], mel[:, :2 * count], embedding


def test_the_folder_loads_into_cosyvoice_classes_without_its_llm(backend, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """The flow and HiFT are CosyVoice2's classes holding flow.pt and hift.pt; the yaml's LLM and data
    pipeline, which fail to build here (no Qwen folder, no pyworld), were left out."""
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice.hifigan.generator import HiFTGenerator

    assert isinstance(backend.flow, CausalMaskedDiffWithXvec) and isinstance(backend.hift, HiFTGenerator)
    flow_file = torch.load(folder / "flow.pt", weights_only=True)
    assert all(torch.equal(flow_file[k], v) for k, v in backend.flow.state_dict().items())
    hift_file = torch.load(folder / "hift.pt", weights_only=True)
    assert all(torch.equal(hift_file[f"generator.{k}"], v) for k, v in backend.hift.state_dict().items())
    assert backend.sample_rate_hertz == 24000


def test_prompt_features_are_the_zero_shot_frontends(backend) -> None:  # type: ignore[no-untyped-def]
    wav = espeak_wav("The quick brown fox jumps over the lazy dog.", "en-us+f3")
    prompt = backend.prompt_features(wav)
    tokens, mel, embedding = frontend_features(backend, wav)
    assert prompt.speech_tokens.dtype == torch.int32 and torch.equal(prompt.speech_tokens, tokens)
    assert prompt.mel.shape == mel.shape and prompt.mel.shape[1] == 2 * tokens.shape[1]
    assert torch.allclose(prompt.mel, mel, atol=1e-5)
    # kaldi-native-fbank against torchaudio's Kaldi fbank: the same algorithm in float32.
    assert torch.allclose(prompt.embedding, embedding, rtol=1e-3, atol=1e-3)


def test_rendering_is_cosyvoice2_models_token2wav(backend) -> None:  # type: ignore[no-untyped-def]
    """Flow then HiFT as CosyVoice2Model.token2wav renders a finished, non-streaming request, with HiFT's
    source noise seeded alike: the same samples."""
    from cosyvoice.cli.model import CosyVoice2Model

    prompt = backend.prompt_features(espeak_wav("Please call Stella.", "en-gb"))
    model = CosyVoice2Model(None, backend.flow, backend.hift, fp16=False)
    request = str(uuid.uuid4())
    model.hift_cache_dict[request] = None
    torch.manual_seed(0)
    with torch.inference_mode():
        reference = model.token2wav(token=torch.tensor([TOKENS], dtype=torch.int32), prompt_token=prompt.speech_tokens,
                                    prompt_feat=prompt.mel, embedding=prompt.embedding, token_offset=0, uuid=request,
                                    finalize=True)  # [1, S]
    rendered = backend.render(TOKENS, prompt)
    assert rendered.shape == (len(TOKENS) * 2 * 480,)  # 2 mel frames per token, 480 samples per frame at 24 kHz
    assert np.array_equal(rendered, reference[0].numpy())


def test_each_item_in_its_own_speakers_voice_and_bad_prompts_fail_alone(backend) -> None:  # type: ignore[no-untyped-def]
    engine = Token2WavEngine(backend)
    first, second = espeak_wav("Good morning to you all.", "en-us+m3"), espeak_wav("Good morning to you all.", "en-gb+f4")
    short = io.BytesIO()
    sf.write(short, np.zeros(800, dtype=np.float32), 16000, format="WAV")  # 50 ms: shorter than the mel's padding
    low = io.BytesIO()
    sf.write(low, np.zeros(8000, dtype=np.float32), 8000, format="WAV")
    results = engine.synthesize_batch([
        SynthesisItem(TOKENS, prompt_audio=first), SynthesisItem(TOKENS, prompt_audio=second),
        SynthesisItem(TOKENS), SynthesisItem(TOKENS, prompt_audio=b"not a wav"),
        SynthesisItem(TOKENS, prompt_audio=short.getvalue()), SynthesisItem(TOKENS, prompt_audio=low.getvalue()),
        SynthesisItem(TOKENS, prompt_audio=first)])
    a, b, again = results[0], results[1], results[6]
    assert isinstance(a, Waveform) and isinstance(b, Waveform) and isinstance(again, Waveform)
    assert not np.allclose(a.samples, b.samples)  # the prompt speaker conditions the flow
    assert np.array_equal(a.samples, again.samples)  # same tokens and prompt: same audio, so the same reward
    failures = results[2:6]
    assert all(isinstance(f, ItemFailure) and f.code == ErrorCode.INVALID_AUDIO and f.field == "prompt_audio"
               for f in failures), failures
    messages = [f.message for f in failures if isinstance(f, ItemFailure)]
    assert "needs a prompt WAV" in messages[0] and "cannot decode audio bytes" in messages[1]
    assert "0.050 s" in messages[2] and "0.1 s to 30 s" in messages[2]
    assert "8000 Hz" in messages[3]


def test_served_on_loopback_with_the_prompt_audio(folder: Path) -> None:
    import grpc

    from speechrl.services.ports import free_port
    from speechrl.services.token2wav.server import Token2WavConfig, start
    from speechrl.v1 import common_pb2, token2wav_pb2, token2wav_pb2_grpc
    from tests.support.servers import serve_in_thread

    prompt = espeak_wav("This is how I sound.", "en-us")
    config = Token2WavConfig(port=free_port(), backend="cosyvoice2", model_dir=str(folder))
    with serve_in_thread(lambda: start(config)) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = token2wav_pb2_grpc.Token2WavStub(channel)
            response = stub.Synthesize(token2wav_pb2.SynthesizeRequest(items=[
                token2wav_pb2.SynthesisItem(tokens=TOKENS, prompt_audio=common_pb2.Audio(encoded=prompt)),
                token2wav_pb2.SynthesisItem(tokens=TOKENS, voice="en-us"),
                token2wav_pb2.SynthesisItem(tokens=[6561], prompt_audio=common_pb2.Audio(encoded=prompt))]))
    spoken, unprompted, outside = response.results
    samples, rate = sf.read(io.BytesIO(spoken.audio.wav))
    assert rate == spoken.audio.sample_rate_hertz == 24000 and len(samples) == len(TOKENS) * 2 * 480
    assert unprompted.error.code == common_pb2.ITEM_ERROR_CODE_INVALID_AUDIO
    assert unprompted.error.field == "items[1].prompt_audio"
    assert outside.error.code == common_pb2.ITEM_ERROR_CODE_INVALID_TENSOR and "0..6560" in outside.error.message


def test_the_recipes_request_through_a_gateway_on_the_cosyvoice2_backend(folder: Path, tmp_path: Path) -> None:
    """docs/integrations/cosyvoice2-recipe.md's setup: token2wav on the cosyvoice2 backend, the gateway with a
    pool of prompt speakers and the pinyin unit, reward_tts.py's own request. The random flow says nothing
    Whisper can read, so the reward is low; what is checked is that every part ran: the recipe's reward of
    the error rate of a transcript of audio rendered in a prompt speaker's voice. Without a pool the item
    has no prompt and its error says so."""
    import httpx

    from speechrl.services.gateway.config import GatewayConfig
    from speechrl.services.gateway.main import create_app
    from speechrl.services.intelligibility.server import IntelligibilityConfig
    from speechrl.services.intelligibility.server import start as start_intelligibility
    from speechrl.services.ports import free_port
    from speechrl.services.token2wav.server import Token2WavConfig, start
    from tests.support.adapters import cosyvoice_payload
    from tests.support.servers import serve_in_thread, uvicorn_in_thread

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "alice.wav").write_bytes(espeak_wav("This is my voice.", "en-us"))
    payload = cosyvoice_payload(TOKENS, "please turn on the kitchen 灯")
    replies = []
    with serve_in_thread(lambda: start(Token2WavConfig(port=free_port(), backend="cosyvoice2",
                                                       model_dir=str(folder)))) as t2w, \
            serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as asr:
        backends = {"token2wav": f"127.0.0.1:{t2w.port}", "intelligibility": f"127.0.0.1:{asr.port}"}
        for pool in (str(prompts), ""):
            config = GatewayConfig(rules="", speaker="", token2wav_prompts=pool, token2wav_asr_error_unit="pinyin",
                                   **backends)
            with uvicorn_in_thread(create_app(config)) as url, httpx.Client(base_url=url, timeout=120) as http:
                replies.append(http.post("/v2/models/token2wav_asr/infer", json=payload, params={"request_id": "0"}))
    pooled, bare = replies
    assert pooled.status_code == 200, pooled.text
    outputs = {o["name"]: o["data"][0] for o in pooled.json()["outputs"]}
    assert 0.0 <= outputs["REWARDS"] < 0.5 and outputs["ERROR_RATE"] > 0.5, outputs
    assert isinstance(outputs["TRANSCRIPTS"], str) and outputs["SCORED"] is True
    unscored = {o["name"]: o["data"][0] for o in bare.json()["outputs"]}
    assert unscored["SCORED"] is False and "INVALID_AUDIO: cosyvoice2 needs a prompt WAV" in unscored["ERRORS"]
