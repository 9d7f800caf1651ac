"""Speaker backends and their features: equal to the reference implementations, batched or not.

Resemblyzer is checked against its own embed_utterance(preprocess_wav(...)); the wespeaker ONNX
backend against the torch module the test exports (a small random ResNet-style network); the
wespeaker checkpoint backend, served over gRPC, against wespeaker's own ResNet34 (tiny, random)
called directly on the features its config.yaml describes.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import soxr
import torch
import yaml
from torch import nn

from speechrl.client.codec import tensor_to_numpy
from speechrl.services.ports import free_port
from speechrl.services.speaker import features
from speechrl.services.speaker.backends import BACKENDS, load_backend, run_grouped_by_length
from speechrl.services.speaker.backends.wespeaker_checkpoint import checkpoint_files, fbank_settings
from speechrl.services.speaker.server import SpeakerConfig, start
from speechrl.v1 import common_pb2, speaker_pb2, speaker_pb2_grpc
from tests.support.servers import Speech, serve_in_thread
from tests.support.wespeaker_model import CONFIG as TINY_CONFIG
from tests.support.wespeaker_model import EMBED_DIM, FEAT_DIM, build_tiny_wespeaker

RATE = 16000


def load16k(data: bytes) -> np.ndarray:
    """Decode and resample exactly as the server does (soundfile, soxr HQ)."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return soxr.resample(samples, rate, RATE, quality="HQ").astype(np.float32)


@pytest.fixture(scope="module")
def waves(speech: Speech) -> list[np.ndarray]:
    return [load16k(speech.wav(text, voice)) for text, voice in [
        ("The quick brown fox jumps over the lazy dog near the river bank.", "en-us"),
        ("Yesterday my neighbour painted the old wooden fence a bright shade of green.", "en-us+f3"),
        ("Guten Morgen, wie geht es Ihnen heute?", "de"),
        ("Hi.", "en-us+m3"),  # shorter than one 1.6 s partial window
    ]]


@pytest.fixture(scope="module")
def resemblyzer() -> object:
    return load_backend("resemblyzer")


# --- Resemblyzer ------------------------------------------------------------------------------


def test_hyperparameters_match_resemblyzer():
    from resemblyzer import hparams

    assert (features.RESEMBLYZER_RATE, features.MEL_WINDOW_MS, features.MEL_STEP_MS, features.MEL_CHANNELS,
            features.PARTIAL_FRAMES, features.VAD_WINDOW_MS, features.VAD_AVERAGE_WIDTH, features.VAD_MAX_SILENCE,
            features.TARGET_DBFS) == (
        hparams.sampling_rate, hparams.mel_window_length, hparams.mel_window_step, hparams.mel_n_channels,
        hparams.partials_n_frames, hparams.vad_window_length, hparams.vad_moving_average_width,
        hparams.vad_max_silence_length, hparams.audio_norm_target_dBFS)


def test_mel_spectrogram_matches_librosa(waves):
    import librosa

    ours = features.MelSpectrogram()(waves[0])
    theirs = librosa.feature.melspectrogram(y=waves[0], sr=RATE, n_fft=400, hop_length=160, n_mels=40).T
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


@pytest.mark.parametrize("n_samples", [0, 100, 16_000, 25_600, 40_000, 123_456])
def test_partial_slices_match_voice_encoder(n_samples):
    from resemblyzer import VoiceEncoder

    _, mel_slices = VoiceEncoder.compute_partial_slices(n_samples, rate=1.3, min_coverage=0.75)
    assert features.partial_slices(n_samples) == mel_slices


def test_resemblyzer_batch_matches_embed_utterance(resemblyzer, waves):
    from resemblyzer import preprocess_wav

    ours = resemblyzer.embed(waves)  # one LSTM forward for every partial of all four utterances
    assert ours.dtype == np.float32 and ours.shape == (len(waves), 256)
    for wav, row in zip(waves, ours, strict=True):
        reference = resemblyzer.encoder.embed_utterance(preprocess_wav(wav))
        assert float(np.dot(reference, row)) > 1 - 1e-4
        np.testing.assert_allclose(row, reference, atol=1e-4)


def test_resemblyzer_batch_equals_one_at_a_time(resemblyzer, waves):
    batched = resemblyzer.embed(waves)
    single = np.concatenate([resemblyzer.embed([w]) for w in waves])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_vad_keeps_unvoiced_audio_instead_of_emptying_it():
    noise = np.random.default_rng(0).normal(0, 1e-3, RATE).astype(np.float32)
    assert len(features.trim_long_silences(noise)) > 0.9 * RATE


# --- wespeaker ONNX ---------------------------------------------------------------------------


class TinyResNet(nn.Module):
    """wespeaker's shape in miniature: 2-D convs over (time, mel), statistics pooling, linear embedding."""

    def __init__(self, feat_dim: int = 80, channels: int = 8, embed_dim: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.embedding = nn.Linear(2 * channels * ((feat_dim + 1) // 2), embed_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.body(feats.unsqueeze(1))  # [B, T, F] -> [B, C, T', F']
        x = x.permute(0, 2, 1, 3).flatten(2)  # [B, T', C*F']
        stats = torch.cat([x.mean(dim=1), torch.sqrt(x.var(dim=1) + 1e-5)], dim=1)  # [B, 2*C*F'] (TSTP)
        return self.embedding(stats)  # [B, D]


def export_onnx(module: nn.Module, path: Path, metadata: dict[str, str], feat_dim: int = 80) -> None:
    import onnx

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (torch.randn(1, 200, feat_dim),), str(path), input_names=["feats"],
                          output_names=["embs"], dynamic_axes={"feats": {0: "B", 1: "T"}, "embs": {0: "B"}},
                          opset_version=14, dynamo=False)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = TinyResNet()
    with torch.no_grad():  # random, non-trivial batch-norm statistics
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("onnx") / "tiny_resnet.onnx"
    export_onnx(module, path, {"framework": "wespeaker", "sample_rate": "16000", "normalize_samples": "0",
                               "output_dim": "32", "language": "English"})
    return module, path


def torch_embeddings(module: nn.Module, feats: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        rows = [module(torch.from_numpy(f)[None]).numpy()[0] for f in feats]
    return np.stack([r / np.linalg.norm(r) for r in rows])


def test_onnx_backend_equals_torch_module_on_the_same_fbank(tiny_onnx, waves):
    module, path = tiny_onnx
    backend = load_backend("wespeaker-onnx", str(path))
    assert (backend.dim, backend.sample_rate, backend.features.num_mel_bins) == (32, 16000, 80)
    batch = [*waves, waves[0].copy()]  # two equal lengths share a session.run
    ours = backend.embed(batch)
    assert ours.dtype == np.float32 and ours.shape == (len(batch), 32)
    np.testing.assert_allclose(ours, torch_embeddings(module, [backend.fbank(w) for w in batch]), atol=1e-5)
    np.testing.assert_allclose(ours[0], ours[-1], atol=1e-6)
    np.testing.assert_allclose(ours, np.concatenate([backend.embed([w]) for w in batch]), atol=1e-6)


def test_fbank_is_wespeakers_cmn_kaldi_fbank(waves):
    feats = features.kaldi_fbank(waves[0], features.FbankSettings())
    assert feats.shape == (1 + (len(waves[0]) - 400) // 160, 80)
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-3)  # CMN
    # Scaling to the int16 range (wespeaker) versus [-1, 1] shifts log energies by 2 log 32768
    # wherever they are above the log floor (espeak's digital silence sits on it).
    scaled = features.kaldi_fbank(waves[0], features.FbankSettings(cmn=False))
    unit = features.kaldi_fbank(waves[0], features.FbankSettings(normalize_samples=True, cmn=False))
    above_floor = unit > -10
    assert above_floor.mean() > 0.5
    np.testing.assert_allclose((scaled - unit)[above_floor], 2 * np.log(32768.0), rtol=1e-3)


def test_onnx_feature_settings_come_from_metadata(tmp_path: Path, waves):
    module = TinyResNet(feat_dim=64)
    path = tmp_path / "meta.onnx"
    export_onnx(module, path, {"framework": "wespeaker", "sample_rate": "8000", "normalize_samples": "1",
                               "window_type": "povey"}, feat_dim=64)
    backend = load_backend("wespeaker-onnx", str(path))
    assert backend.features == features.FbankSettings(sample_rate=8000, num_mel_bins=64, window_type="povey",
                                                      normalize_samples=True)
    assert backend.dim == 32 and backend.sample_rate == 8000
    wav8k = soxr.resample(waves[1], RATE, 8000).astype(np.float32)
    np.testing.assert_allclose(backend.embed([wav8k]), torch_embeddings(module, [backend.fbank(wav8k)]), atol=1e-5)


def test_grouping_by_length_keeps_order():
    calls: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.mean(axis=1)

    feats = [np.full((n, 2), float(i)) for i, n in enumerate([3, 5, 3, 5, 7])]
    assert run_grouped_by_length(feats, forward)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sorted(calls) == [1, 2, 2]


@pytest.fixture(scope="module")
def onnx_stub(tiny_onnx) -> Iterator[speaker_pb2_grpc.SpeakerSimilarityScorerStub]:
    config = SpeakerConfig(port=free_port(), backend="wespeaker-onnx", model_path=str(tiny_onnx[1]),
                           default_reward_mapping="shifted")
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield speaker_pb2_grpc.SpeakerSimilarityScorerStub(channel)


def test_onnx_backend_serves_scores_embeddings_and_short_audio_errors(onnx_stub, speech):
    clip = common_pb2.Audio(encoded=speech.wav("Testing one two three.", "en-us+f3"))
    too_short = common_pb2.Audio(pcm=common_pb2.RawPcm(data=np.full(800, 0.1, "<f4").tobytes(), sample_rate_hertz=RATE,
                                                       encoding=common_pb2.PCM_F32LE))  # 50 ms: under 10 frames
    embedded = onnx_stub.EmbedSpeaker(speaker_pb2.EmbedSpeakerRequest(audios=[clip, too_short])).results
    assert tensor_to_numpy(embedded[0].embedding).shape == (32,)
    assert embedded[1].error.code == common_pb2.ITEM_ERROR_CODE_INVALID_AUDIO and "shorter" in embedded[1].error.message
    scored = onnx_stub.ScoreSpeakerSimilarity(speaker_pb2.ScoreSpeakerSimilarityRequest(items=[
        speaker_pb2.SpeakerSimilarityItem(audio=clip, reference_audio=clip),
        speaker_pb2.SpeakerSimilarityItem(audio=clip, reference_embedding=embedded[0].embedding)])).results
    for result in scored:  # the server's default mapping here is "shifted": (cos + 1) / 2
        assert result.score.cosine == pytest.approx(1.0, abs=1e-5)
        assert result.score.reward == pytest.approx(1.0, abs=1e-5)
        assert result.score.reward_mapping == speaker_pb2.SIMILARITY_REWARD_MAPPING_SHIFTED


def test_onnx_backend_needs_a_model_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="model-path"):
        load_backend("wespeaker-onnx", str(tmp_path / "missing.onnx"))


# --- wespeaker checkpoint ---------------------------------------------------------------------
# The `wespeaker` package is the wespeaker-unofficial wheel (scripts/bootstrap.sh); the tiny model is
# wespeaker's own ResNet34, saved by wespeaker's own save_checkpoint (tests/support/wespeaker_model.py).

# What tests/support/wespeaker_model.py's config.yaml asks for: 32 mel bins, 30 ms frames every 12 ms.
TINY_FBANK = features.FbankSettings(num_mel_bins=FEAT_DIM, frame_length_ms=30.0, frame_shift_ms=12.0)


@pytest.fixture(scope="module")
def tiny_wespeaker(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    folder = tmp_path_factory.mktemp("wespeaker") / "tiny_resnet34"
    return build_tiny_wespeaker(folder), folder


def wespeaker_embedding(network: nn.Module, wav: np.ndarray) -> np.ndarray:
    """wespeaker's network called directly on the features config.yaml describes; a unit [D] row."""
    feats = torch.from_numpy(features.kaldi_fbank(wav, TINY_FBANK))[None]  # [1, T, F]
    with torch.no_grad():
        row = network(feats)[-1][0].numpy()  # wespeaker's ResNet returns (0, embed_a)
    return row / np.linalg.norm(row)


def pcm(wav: np.ndarray) -> common_pb2.Audio:
    """Float PCM at the model's rate: the server decodes it to exactly these samples (no resampling)."""
    return common_pb2.Audio(pcm=common_pb2.RawPcm(data=wav.astype("<f4").tobytes(), sample_rate_hertz=RATE,
                                                  encoding=common_pb2.PCM_F32LE))


@pytest.fixture(scope="module")
def checkpoint_stub(tiny_wespeaker) -> Iterator[speaker_pb2_grpc.SpeakerSimilarityScorerStub]:
    config = SpeakerConfig(port=free_port(), backend="wespeaker-checkpoint", model_path=str(tiny_wespeaker[1]))
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield speaker_pb2_grpc.SpeakerSimilarityScorerStub(channel)


def test_checkpoint_server_embeds_as_wespeakers_own_model(tiny_wespeaker, checkpoint_stub, waves):
    network, _ = tiny_wespeaker
    batch = [waves[1], waves[0], waves[3], waves[2], waves[0]]  # mixed lengths, one repeated
    results = checkpoint_stub.EmbedSpeaker(speaker_pb2.EmbedSpeakerRequest(audios=[pcm(w) for w in batch])).results
    assert len(results) == len(batch)
    for wav, result in zip(batch, results, strict=True):  # one result per item, in request order
        served = tensor_to_numpy(result.embedding)
        reference = wespeaker_embedding(network, wav)
        assert served.shape == (EMBED_DIM,)
        assert float(np.dot(served, reference)) > 1 - 1e-5
        np.testing.assert_allclose(served, reference, atol=1e-4)


def test_checkpoint_server_scores_the_cosine_of_wespeakers_embeddings(tiny_wespeaker, checkpoint_stub, waves):
    network, _ = tiny_wespeaker
    reference = [wespeaker_embedding(network, w) for w in waves]
    pairs = [(0, 1), (1, 2), (2, 2), (3, 0), (2, 1)]
    items = [speaker_pb2.SpeakerSimilarityItem(audio=pcm(waves[a]), reference_audio=pcm(waves[b])) for a, b in pairs]
    results = checkpoint_stub.ScoreSpeakerSimilarity(speaker_pb2.ScoreSpeakerSimilarityRequest(items=items)).results
    assert len(results) == len(pairs)
    expected = [float(np.dot(reference[a], reference[b])) for a, b in pairs]
    # Far apart (the tolerance is 1e-4), so a score given to the wrong item fails; (1, 2) = (2, 1).
    assert min(abs(x - y) for x, y in itertools.combinations(sorted(set(expected[:4])), 2)) > 1e-3
    for (a, b), want, result in zip(pairs, expected, results, strict=True):
        assert result.score.cosine == pytest.approx(want, abs=1e-4), (a, b)
        assert result.score.reward == pytest.approx(want, abs=1e-4)  # the server's default mapping: raw cosine


def corrupt_garbage(folder: Path) -> None:
    (folder / "avg_model.pt").write_bytes(b"this is not a torch checkpoint")


def corrupt_truncated(folder: Path) -> None:
    data = (folder / "avg_model.pt").read_bytes()
    (folder / "avg_model.pt").write_bytes(data[: len(data) // 2])


def corrupt_missing(folder: Path) -> None:
    (folder / "avg_model.pt").unlink()


def corrupt_other_architecture(folder: Path) -> None:
    # ResNet18's tensors are a subset of ResNet34's with equal shapes: wespeaker's own load_checkpoint
    # (strict=False) would load them and leave ResNet34's other blocks random, scoring plausibly low.
    build_tiny_wespeaker(folder / "resnet18", config={**TINY_CONFIG, "model": "ResNet18"})
    (folder / "resnet18" / "avg_model.pt").replace(folder / "avg_model.pt")


async def start_then_stop(config: SpeakerConfig) -> None:
    """Start the real server; should it start after all (the bug), stop it so the test fails, not hangs."""
    running = await start(config)
    await running.stop(0)


def corrupt_model_name(folder: Path) -> None:
    # wespeaker's get_speaker_model prints and calls exit(1) for a name it does not know.
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY_CONFIG, "model": "Transformer9"}))


@pytest.mark.parametrize(("corrupt", "error", "match"), [
    (corrupt_garbage, ValueError, "avg_model.pt cannot be read"),
    (corrupt_truncated, ValueError, "avg_model.pt cannot be read"),
    (corrupt_missing, FileNotFoundError, "avg_model.pt not found"),
    (corrupt_other_architecture, ValueError, "avg_model.pt does not fit"),
    (corrupt_model_name, ValueError, "config.yaml: wespeaker has no speaker model 'Transformer9'"),
])
def test_checkpoint_server_refuses_a_bad_checkpoint_at_start(tmp_path: Path, corrupt, error, match):
    folder = tmp_path / "model"
    build_tiny_wespeaker(folder)
    corrupt(folder)
    config = SpeakerConfig(port=free_port(), backend="wespeaker-checkpoint", model_path=str(folder))
    with pytest.raises(error, match=match) as info:
        asyncio.run(start_then_stop(config))
    assert str(folder) in str(info.value)


def test_checkpoint_files_follow_wespeakers_layouts(tmp_path: Path):
    released, run = tmp_path / "voxceleb_resnet34", tmp_path / "exp"  # a hub folder; a training run's exp_dir
    for path in (released / "config.yaml", released / "avg_model.pt", run / "config.yaml", run / "models" / "avg_model.pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert checkpoint_files(str(released)) == (released / "config.yaml", released / "avg_model.pt")
    assert checkpoint_files(str(released / "avg_model.pt")) == (released / "config.yaml", released / "avg_model.pt")
    assert checkpoint_files(str(run / "models" / "avg_model.pt")) == (run / "config.yaml", run / "models" / "avg_model.pt")
    (released / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        checkpoint_files(str(released))


def test_checkpoint_features_come_from_config_yaml():
    # examples/voxceleb/v2/conf/resnet.yaml's settings are wespeaker's inference defaults.
    voxceleb = {"model": "ResNet34", "model_args": {"feat_dim": 80, "embed_dim": 256},
                "dataset_args": {"resample_rate": 16000, "fbank_args": {"num_mel_bins": 80, "frame_shift": 10,
                                                                        "frame_length": 25, "dither": 1.0}}}
    assert fbank_settings(voxceleb) == features.FbankSettings()
    assert fbank_settings(TINY_CONFIG) == TINY_FBANK
    other = {"model_args": {"feat_dim": 64}, "dataset_args": {
        "resample_rate": 8000, "cmvn": False, "fbank_args": {"num_mel_bins": 64, "frame_length": 20, "frame_shift": 8,
                                                             "window_type": "povey", "normalize_samples": True}}}
    assert fbank_settings(other) == features.FbankSettings(sample_rate=8000, num_mel_bins=64, frame_length_ms=20.0,
                                                           frame_shift_ms=8.0, window_type="povey",
                                                           normalize_samples=True, cmn=False)
    with pytest.raises(ValueError, match="feat_dim=80"):
        fbank_settings({**voxceleb, "model_args": {"feat_dim": 80}, "dataset_args": other["dataset_args"]})
    with pytest.raises(ValueError, match="norm_var"):
        fbank_settings({"dataset_args": {"cmvn_args": {"norm_mean": True, "norm_var": True}}})


def test_checkpoint_backend_says_how_to_get_wespeaker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    build_tiny_wespeaker(tmp_path)
    monkeypatch.setitem(sys.modules, "wespeaker.models.speaker_model", None)  # as if the package were absent
    with pytest.raises(RuntimeError) as info:
        load_backend("wespeaker-checkpoint", str(tmp_path))
    message = str(info.value)
    assert "wespeaker-unofficial" in message and "pip install" in message and "wespeaker-onnx" in message


def test_backend_registry_rejects_unknown_names():
    assert set(BACKENDS) == {"resemblyzer", "wespeaker-onnx", "wespeaker-checkpoint"}
    with pytest.raises(ValueError, match="unknown speaker backend"):
        load_backend("ecapa")
