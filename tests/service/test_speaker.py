"""Speaker-similarity service contract: a real server with the real Resemblyzer model, over real gRPC."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from speechrl.client import SpeakerClient, SpeakerId
from speechrl.client.codec import numpy_to_tensor, tensor_to_numpy
from speechrl.client.speaker_request import score_request, speaker_item
from speechrl.services.audio import AudioInput
from speechrl.services.config import from_namespace
from speechrl.services.ports import free_port
from speechrl.services.speaker.engine import ScoreItem, SimilarityScore, SpeakerRegistry
from speechrl.services.speaker.server import SpeakerConfig, build_engine, start
from speechrl.v1 import common_pb2, common_pb2_grpc, speaker_pb2, speaker_pb2_grpc
from tests.support.servers import RedisServer, Speech, serve_in_thread

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
OTHER_SENTENCE = "Yesterday my neighbour painted the old wooden fence a bright shade of green."
MAX_SECONDS = 8.0
RATE = 16000

Item = speaker_pb2.SpeakerSimilarityItem
Code = common_pb2.ItemErrorCode


def audio(data: bytes) -> common_pb2.Audio:
    return common_pb2.Audio(encoded=data)


def pcm(samples: np.ndarray, rate: int = RATE) -> common_pb2.Audio:
    return common_pb2.Audio(pcm=common_pb2.RawPcm(data=samples.astype("<f4").tobytes(), sample_rate_hertz=rate,
                                                  encoding=common_pb2.PCM_F32LE))


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    # A 20 ms batching window so that concurrent requests visibly share batches.
    config = SpeakerConfig(port=free_port(), max_wait_ms=20, max_audio_seconds=MAX_SECONDS)
    with serve_in_thread(lambda: start(config)) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def channel(endpoint: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(endpoint) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> speaker_pb2_grpc.SpeakerSimilarityScorerStub:
    return speaker_pb2_grpc.SpeakerSimilarityScorerStub(channel)


@pytest.fixture(scope="module")
def clips(speech: Speech) -> dict[str, bytes]:
    return {
        "ref": speech.wav(SENTENCE),
        "same": speech.wav(OTHER_SENTENCE),
        "f3": speech.wav(OTHER_SENTENCE, voice="en-us+f3"),
        "m3": speech.wav(OTHER_SENTENCE, voice="en-us+m3"),
        "de": speech.wav("Gestern hat mein Nachbar den alten Holzzaun hellgrün gestrichen.", voice="de"),
    }


def score(stub: speaker_pb2_grpc.SpeakerSimilarityScorerStub, *items: Item,
          mapping: int = speaker_pb2.SIMILARITY_REWARD_MAPPING_UNSPECIFIED) -> list[speaker_pb2.SpeakerSimilarityResult]:
    request = speaker_pb2.ScoreSpeakerSimilarityRequest(items=list(items), reward_mapping=mapping)
    return list(stub.ScoreSpeakerSimilarity(request).results)


def embed(stub: speaker_pb2_grpc.SpeakerSimilarityScorerStub, data: bytes) -> np.ndarray:
    result = stub.EmbedSpeaker(speaker_pb2.EmbedSpeakerRequest(audios=[audio(data)])).results[0]
    assert result.WhichOneof("outcome") == "embedding", result
    return tensor_to_numpy(result.embedding)


def test_same_voice_scores_higher_than_other_voices(stub, clips):
    others = ["f3", "m3", "de"]
    results = score(stub, *(Item(audio=audio(clips[name]), reference_audio=audio(clips["ref"]))
                            for name in ["same", *others]))
    cosines = {name: r.score.cosine for name, r in zip(["same", *others], results, strict=True)}
    assert all(-1.0 <= c <= 1.0 for c in cosines.values())
    for name in others:
        assert cosines["same"] > cosines[name] + 0.05, cosines
    assert results[0].score.reward_mapping == speaker_pb2.SIMILARITY_REWARD_MAPPING_COSINE  # the server default


def test_embed_speaker_returns_unit_float32_256(stub, clips):
    vector = embed(stub, clips["ref"])
    assert vector.dtype == np.float32 and vector.shape == (256,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_registered_speaker_and_embedding_references_equal_audio_reference(stub, clips):
    registered = stub.RegisterSpeaker(speaker_pb2.RegisterSpeakerRequest(speaker_id="narrator", audios=[audio(clips["ref"])]))
    assert registered.speaker_id == "narrator"
    stored = tensor_to_numpy(registered.embedding)
    np.testing.assert_allclose(stored, embed(stub, clips["ref"]), atol=1e-6)
    by_audio, by_id, by_embedding = score(
        stub,
        Item(audio=audio(clips["f3"]), reference_audio=audio(clips["ref"])),
        Item(audio=audio(clips["f3"]), speaker_id="narrator"),
        Item(audio=audio(clips["f3"]), reference_embedding=numpy_to_tensor(stored)))
    assert by_id.score.cosine == pytest.approx(by_audio.score.cosine, abs=1e-6)
    assert by_embedding.score.cosine == pytest.approx(by_audio.score.cosine, abs=1e-6)


def test_register_several_audios_stores_their_normalised_mean(stub, clips):
    vectors = [embed(stub, clips[name]) for name in ("ref", "same")]
    stored = tensor_to_numpy(stub.RegisterSpeaker(speaker_pb2.RegisterSpeakerRequest(
        speaker_id="narrator-2", audios=[audio(clips["ref"]), audio(clips["same"])])).embedding)
    mean = np.mean(vectors, axis=0)
    np.testing.assert_allclose(stored, mean / np.linalg.norm(mean), atol=1e-5)


@pytest.mark.parametrize(("mapping", "transform"), [
    (speaker_pb2.SIMILARITY_REWARD_MAPPING_COSINE, lambda c: c),
    (speaker_pb2.SIMILARITY_REWARD_MAPPING_SHIFTED, lambda c: (c + 1) / 2),
    (speaker_pb2.SIMILARITY_REWARD_MAPPING_CLIPPED, lambda c: max(c, 0.0)),
])
def test_reward_mappings(stub, clips, mapping, transform):
    # A reference embedding pointing away from the audio's makes the cosine negative, so CLIPPED shows.
    opposite = numpy_to_tensor(-embed(stub, clips["ref"]))
    results = score(stub, Item(audio=audio(clips["same"]), reference_audio=audio(clips["ref"])),
                    Item(audio=audio(clips["same"]), reference_embedding=opposite), mapping=mapping)
    assert results[1].score.cosine < 0
    for result in results:
        assert result.score.reward_mapping == mapping
        assert result.score.reward == pytest.approx(transform(result.score.cosine))


def test_per_item_errors_leave_neighbours_alone(stub, clips):
    good = Item(audio=audio(clips["same"]), reference_audio=audio(clips["ref"]))
    reference = embed(stub, clips["ref"])
    bad_tensors = {
        "wrong dim": numpy_to_tensor(reference[:128]),
        "byte length": common_pb2.Tensor(data=b"\x00" * 10, dtype=common_pb2.DTYPE_FLOAT32, shape=[256]),
        "int dtype": numpy_to_tensor(np.ones(256, dtype=np.int32)),
        "NaN": numpy_to_tensor(np.full(256, np.nan, dtype=np.float32)),
        "zero norm": numpy_to_tensor(np.zeros(256, dtype=np.float32)),
    }
    bad_items = [
        (Item(audio=audio(b"RIFF not really a wav"), reference_audio=audio(clips["ref"])), Code.ITEM_ERROR_CODE_INVALID_AUDIO, "audio"),
        (Item(audio=audio(b""), reference_audio=audio(clips["ref"])), Code.ITEM_ERROR_CODE_EMPTY_AUDIO, "audio"),
        (Item(audio=pcm(np.zeros(0)), reference_audio=audio(clips["ref"])), Code.ITEM_ERROR_CODE_EMPTY_AUDIO, "audio"),
        (Item(audio=pcm(np.full(RATE, np.nan)), reference_audio=audio(clips["ref"])), Code.ITEM_ERROR_CODE_NON_FINITE_AUDIO, "audio"),
        (Item(audio=pcm(np.full(int(RATE * (MAX_SECONDS + 1)), 0.1)), reference_audio=audio(clips["ref"])),
         Code.ITEM_ERROR_CODE_AUDIO_TOO_LONG, "audio"),
        (Item(audio=pcm(np.zeros(RATE)), reference_audio=audio(clips["ref"])), Code.ITEM_ERROR_CODE_EMPTY_AUDIO, "audio"),
        (Item(audio=audio(clips["same"]), reference_audio=audio(b"garbage")), Code.ITEM_ERROR_CODE_INVALID_AUDIO, "reference_audio"),
        (Item(audio=audio(clips["same"]), speaker_id="nobody-registered-this"), Code.ITEM_ERROR_CODE_UNKNOWN_SPEAKER, "speaker_id"),
        *((Item(audio=audio(clips["same"]), reference_embedding=t), Code.ITEM_ERROR_CODE_INVALID_TENSOR, "reference_embedding")
          for t in bad_tensors.values()),
    ]
    baseline = score(stub, good)[0].score.cosine
    items = [good]
    for item, _, _ in bad_items:
        items += [item, good]
    results = score(stub, *items)
    assert len(results) == len(items)
    for index in range(0, len(items), 2):
        assert results[index].score.cosine == pytest.approx(baseline, abs=1e-6), index
    for n, (_, code, field) in enumerate(bad_items):
        index = 2 * n + 1
        error = results[index].error
        assert results[index].WhichOneof("outcome") == "error", (n, results[index])
        assert error.code == code, (n, error)
        assert error.field == f"items[{index}].{field}", error
        assert error.message
    # A failure is never dressed up as a score.
    assert all(r.WhichOneof("outcome") == "error" for r in results[1::2])


# ---- a GRPO group's prompt speaker sent once: reference_audios and reference_index ----

def group_samples(clips: dict[str, bytes]) -> list[bytes]:
    """G = 8 samples of one prompt, two of them identical (as sampling can give)."""
    return [clips[name] for name in ("same", "f3", "m3", "de", "same", "m3", "f3", "de")]


def test_a_shared_reference_scores_exactly_as_inline_references(endpoint, stub, clips):
    samples = group_samples(clips)
    inline = score(stub, *(Item(audio=audio(s), reference_audio=audio(clips["ref"])) for s in samples))
    shared = stub.ScoreSpeakerSimilarity(speaker_pb2.ScoreSpeakerSimilarityRequest(
        reference_audios=[audio(clips["ref"])], items=[Item(audio=audio(s), reference_index=0) for s in samples])).results
    with SpeakerClient(endpoint, timeout_s=60) as client:
        by_sdk = client.score(samples, clips["ref"])  # one reference for all: the SDK shares it
    expected = [r.score.cosine for r in inline]
    assert all(r.WhichOneof("outcome") == "score" for r in inline)
    assert [r.score.cosine for r in shared] == expected
    assert [r.score.cosine for r in by_sdk] == expected


def test_the_sdk_sends_a_shared_reference_once(clips, tmp_path):
    samples = group_samples(clips)
    path = tmp_path / "prompt.wav"
    path.write_bytes(clips["ref"])
    inline = speaker_pb2.ScoreSpeakerSimilarityRequest(items=[speaker_item(s, clips["ref"]) for s in samples])
    # The same object, equal paths, equal bytes, equal messages (as the gateway builds from JSON): one audio each.
    for references in ([clips["ref"]] * 8, [str(path) for _ in samples], [path] * 4 + [str(path)] * 4,
                       [bytes(bytearray(clips["ref"])) for _ in samples], [audio(clips["ref"]) for _ in samples]):
        request = score_request(samples, references, None)
        assert [a.encoded for a in request.reference_audios] == [clips["ref"]]
        assert [item.reference_index for item in request.items] == [0] * 8
        assert [item.audio.encoded for item in request.items] == samples
        assert request.ByteSize() < inline.ByteSize() - 7 * len(clips["ref"]) + 100  # 7 copies of the reference fewer
    # Several groups in one call: one audio per prompt speaker; a reference used once stays inline.
    mixed = score_request(samples[:5], [clips["ref"], clips["f3"], clips["ref"], clips["f3"], clips["m3"]], None)
    assert [a.encoded for a in mixed.reference_audios] == [clips["ref"], clips["f3"]]
    assert [item.WhichOneof("reference") for item in mixed.items] == ["reference_index"] * 4 + ["reference_audio"]
    assert [item.reference_index for item in mixed.items[:4]] == [0, 1, 0, 1]
    # Names and embeddings are never shared audio.
    names = score_request(samples[:2], [SpeakerId("alice"), np.ones(256, np.float32)], None)
    assert not names.reference_audios and [i.WhichOneof("reference") for i in names.items] == ["speaker_id", "reference_embedding"]


def test_reference_index_out_of_range_is_invalid_argument(stub, clips):
    request = speaker_pb2.ScoreSpeakerSimilarityRequest(
        reference_audios=[audio(clips["ref"]), audio(clips["f3"])],
        items=[Item(audio=audio(clips["same"]), reference_index=i) for i in (0, 1, 0, 5)])
    with pytest.raises(grpc.RpcError) as info:
        stub.ScoreSpeakerSimilarity(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "items[3].reference_index: 5 is out of range (the request has 2 reference_audios)"
    del request.items[3]
    assert [r.WhichOneof("outcome") for r in stub.ScoreSpeakerSimilarity(request).results] == ["score"] * 3


def test_a_bad_shared_reference_fails_only_the_items_using_it(stub, clips):
    too_long = pcm(np.full(int(RATE * (MAX_SECONDS + 1)), 0.1))
    shared = [audio(clips["ref"]), audio(b"RIFF not really a wav"), audio(b""), too_long]
    expected_errors = {1: Code.ITEM_ERROR_CODE_INVALID_AUDIO, 2: Code.ITEM_ERROR_CODE_EMPTY_AUDIO,
                       3: Code.ITEM_ERROR_CODE_AUDIO_TOO_LONG}
    uses = [0, 1, 2, 3, 0, 1, 2, 3, 0]
    results = stub.ScoreSpeakerSimilarity(speaker_pb2.ScoreSpeakerSimilarityRequest(
        reference_audios=shared, items=[Item(audio=audio(clips["same"]), reference_index=k) for k in uses])).results
    baseline = score(stub, Item(audio=audio(clips["same"]), reference_audio=audio(clips["ref"])))[0].score.cosine
    for index, (k, result) in enumerate(zip(uses, results, strict=True)):
        if k == 0:
            assert result.score.cosine == pytest.approx(baseline, abs=1e-6), index
            continue
        assert result.WhichOneof("outcome") == "error", (index, result)
        assert (result.error.code, result.error.field) == (expected_errors[k], f"items[{index}].reference_audio")
        assert result.error.message


def test_embed_speaker_reports_errors_per_audio(stub, clips):
    response = stub.EmbedSpeaker(speaker_pb2.EmbedSpeakerRequest(audios=[audio(clips["ref"]), audio(b"junk"), audio(clips["f3"])]))
    assert [r.WhichOneof("outcome") for r in response.results] == ["embedding", "error", "embedding"]
    assert response.results[1].error.code == Code.ITEM_ERROR_CODE_INVALID_AUDIO
    assert response.results[1].error.field == "audios[1]"


@pytest.mark.parametrize("call", ["no items", "no reference", "bad mapping", "embed none", "register no id",
                                  "register no audios", "register bad audio"])
def test_malformed_requests_are_invalid_argument(stub, clips, call):
    good = audio(clips["ref"])
    calls = {
        "no items": (stub.ScoreSpeakerSimilarity, speaker_pb2.ScoreSpeakerSimilarityRequest(), "items"),
        "no reference": (stub.ScoreSpeakerSimilarity, speaker_pb2.ScoreSpeakerSimilarityRequest(
            items=[Item(audio=good, reference_audio=good), Item(audio=good)]), "items[1].reference"),
        "bad mapping": (stub.ScoreSpeakerSimilarity, speaker_pb2.ScoreSpeakerSimilarityRequest(
            items=[Item(audio=good, reference_audio=good)], reward_mapping=42), "reward_mapping"),  # type: ignore[arg-type]
        "embed none": (stub.EmbedSpeaker, speaker_pb2.EmbedSpeakerRequest(), "audios"),
        "register no id": (stub.RegisterSpeaker, speaker_pb2.RegisterSpeakerRequest(speaker_id=" ", audios=[good]), "speaker_id"),
        "register no audios": (stub.RegisterSpeaker, speaker_pb2.RegisterSpeakerRequest(speaker_id="x"), "audios"),
        "register bad audio": (stub.RegisterSpeaker, speaker_pb2.RegisterSpeakerRequest(
            speaker_id="x", audios=[good, audio(b"junk")]), "audios[1]"),
    }
    method, request, field = calls[call]
    with pytest.raises(grpc.RpcError) as info:
        method(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_server_still_answers_and_reports_status(stub, channel, clips):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="speechrl.v1.SpeakerSimilarityScorer"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert status.backend == "resemblyzer" and status.items_processed > 0 and status.items_failed > 0
    result = score(stub, Item(audio=audio(clips["same"]), reference_audio=audio(clips["ref"])))[0]
    assert result.WhichOneof("outcome") == "score" and math.isfinite(result.score.cosine)


def test_concurrent_single_item_requests_share_batches(stub, clips):
    def batches() -> float:
        return REGISTRY.get_sample_value("speechrl_batch_size_count", {"batcher": "speaker"}) or 0.0

    request = speaker_pb2.ScoreSpeakerSimilarityRequest(items=[Item(audio=audio(clips["same"]), speaker_id="narrator")])
    stub.RegisterSpeaker(speaker_pb2.RegisterSpeakerRequest(speaker_id="narrator", audios=[audio(clips["ref"])]))
    before = batches()
    futures = [stub.ScoreSpeakerSimilarity.future(request) for _ in range(12)]
    cosines = [f.result().results[0].score.cosine for f in futures]
    assert max(cosines) - min(cosines) < 1e-6  # a batch's neighbours do not change a score
    assert batches() - before < 12, "12 concurrent requests ran as 12 separate batches"


def test_a_reference_shared_by_a_group_is_embedded_once_per_batch(clips):
    engine = build_engine(SpeakerConfig())
    embedded: list[int] = []
    real_embed = engine.backend.embed
    engine.backend.embed = lambda waves: (embedded.append(len(waves)), real_embed(waves))[1]  # type: ignore[method-assign]
    reference = AudioInput(encoded=clips["ref"])
    # A GRPO group: G samples (two of them identical) against one prompt speaker.
    samples = [clips["same"], clips["f3"], clips["m3"], clips["same"]]
    batch = [ScoreItem(AudioInput(encoded=s), reference) for s in samples]
    results = engine.process(batch)
    assert embedded == [4]  # ref, same, f3, m3: each distinct audio once
    alone = [engine.process([item])[0] for item in batch]
    for together, single in zip(results, alone, strict=True):
        assert isinstance(together, SimilarityScore) and isinstance(single, SimilarityScore)
        assert together.cosine == pytest.approx(single.cosine, abs=1e-5)  # sharing changes no score


def test_registry_forgets_least_recently_used():
    registry = SpeakerRegistry(max_speakers=2)
    for name in ("a", "b"):
        registry.put(name, np.ones(2, np.float32))
    assert registry.get("a") is not None  # "a" is now the most recently used
    registry.put("c", np.ones(2, np.float32))
    assert registry.get("b") is None and registry.get("a") is not None and len(registry) == 2


def test_config_validation_and_environment():
    config = from_namespace(SpeakerConfig, "speaker", environ={"SPEECHRL_SPEAKER_DEFAULT_REWARD_MAPPING": "shifted",
                                                                "SPEECHRL_SPEAKER_MAX_SPEAKERS": "7"})
    assert config.default_reward_mapping == "shifted" and config.max_speakers == 7
    for bad in ({"backend": "nope"}, {"backend": "wespeaker-onnx"}, {"default_reward_mapping": "linear"},
                {"max_speakers": 0}):
        with pytest.raises(ValueError):
            SpeakerConfig(**bad)  # type: ignore[arg-type]


def test_batches_run_under_the_gpu_lease(redis_server: RedisServer, clips):
    # The CPU stands in for a shared GPU: the model leaves the "device" after every leased batch.
    config = SpeakerConfig(port=free_port(), lease_device="cpu:0", residency="offload", redis_url=redis_server.url)
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = speaker_pb2_grpc.SpeakerSimilarityScorerStub(channel)
        assert score(stub, Item(audio=audio(clips["same"]), reference_audio=audio(clips["ref"])))[0].score.cosine > 0.5
        status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
        assert status.residency == "offloaded" and status.lease.device == "cpu:0" and not status.lease.held
