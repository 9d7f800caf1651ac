"""token2wav with real espeak-ng audio judged by the real intelligibility scorer's model (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from speechrl.rewards import error_rates
from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.intelligibility.backends import BackendOptions as AsrOptions
from speechrl.services.intelligibility.backends import load_backend as load_asr
from speechrl.services.token2wav.backends import BackendOptions, SynthesisItem, Waveform, load_backend
from speechrl.services.token2wav.engine import Token2WavEngine
from speechrl.services.token2wav.tokens import VOCABULARY, VOICE_TOKENS, PhonemeVocabulary

SENTENCES = ["The weather today is sunny with a light breeze from the west.",
             "Please call Stella and ask her to bring these things from the store."]


@pytest.fixture(scope="module")
def engine() -> Token2WavEngine:
    return Token2WavEngine(load_backend("espeak-phonemes", BackendOptions()))


def test_text_to_tokens_round_trips_through_espeak_phoneme_strings() -> None:
    vocab = PhonemeVocabulary()
    ids = vocab.text_to_ids("the cat sat")
    assert all(0 <= i < len(VOCABULARY) for i in ids)
    assert vocab.ids_to_phonemes(ids) == "D@2 k'at s'at"  # espeak's -x of the phrase


def test_tokens_of_a_sentence_are_intelligible_to_whisper(engine: Token2WavEngine) -> None:
    asr = load_asr("faster-whisper", AsrOptions())
    vocab = PhonemeVocabulary()
    items = [SynthesisItem(vocab.text_to_ids(s), voice=v) for s in SENTENCES for v in ("en-us", "en-gb+f3")]
    waves = engine.synthesize_batch(items)
    audio = []
    for wave in waves:
        assert isinstance(wave, Waveform)
        assert wave.samples.dtype == np.float32 and len(wave.samples) > wave.sample_rate_hertz  # over a second
        audio.append(soxr.resample(wave.samples, wave.sample_rate_hertz, asr.sample_rate).astype(np.float32))
    transcripts = asr.transcribe(audio, ["en"] * len(audio))
    for transcript, item_text in zip(transcripts, [s for s in SENTENCES for _ in range(2)], strict=True):
        assert error_rates(transcript, item_text).wer < 0.5, transcript


def test_bad_items_fail_alone(engine: Token2WavEngine) -> None:
    good = PhonemeVocabulary().text_to_ids("hello")
    results = engine.synthesize_batch([SynthesisItem([]), SynthesisItem([len(VOCABULARY)]), SynthesisItem(good),
                                       SynthesisItem(good, voice="nonexistentvoice"), SynthesisItem([0, 0])])
    assert [type(r) for r in results] == [ItemFailure, ItemFailure, Waveform, ItemFailure, ItemFailure]
    codes = [r.code for r in results if isinstance(r, ItemFailure)]
    assert codes == [ErrorCode.EMPTY_TEXT, ErrorCode.INVALID_TENSOR, ErrorCode.UNKNOWN_SPEAKER, ErrorCode.EMPTY_TEXT]


def test_a_voice_token_names_the_voice_and_says_nothing(engine: Token2WavEngine) -> None:
    """The first voice token replaces the variant of the item's voice, wherever it stands; later ones and the
    token itself are silent; a sequence without one is spoken in the item's voice, as before they existed."""
    ids = PhonemeVocabulary().text_to_ids("the weather today is sunny")
    m3, m1 = VOCABULARY.index("+m3"), VOCABULARY.index("+m1")
    first, inside, plain, as_m3, alone = engine.synthesize_batch([
        SynthesisItem([m3, *ids], voice="en-us+m7"), SynthesisItem([*ids[:3], m3, *ids[3:], m1], voice="en-us+m7"),
        SynthesisItem(ids, voice="en-us+m7"), SynthesisItem(ids, voice="en-us+m3"), SynthesisItem([m3], voice="en-us")])
    assert isinstance(first, Waveform) and isinstance(inside, Waveform) and isinstance(plain, Waveform)
    assert isinstance(as_m3, Waveform)
    assert np.array_equal(first.samples, as_m3.samples) and np.array_equal(inside.samples, as_m3.samples)
    assert not np.array_equal(plain.samples, as_m3.samples)
    assert isinstance(alone, ItemFailure) and alone.code == ErrorCode.EMPTY_TEXT


def test_voice_tokens_move_the_speaker_similarity(engine: Token2WavEngine) -> None:
    """What the TTS reproduction's SIM reward acts through: Resemblyzer's cosine of a sentence to a reference
    sentence in en-us+m7 is high when the voice token says +m7, and clearly lower for every other one."""
    from speechrl.services.speaker.backends import load_backend as load_speaker

    speaker = load_speaker("resemblyzer", threads=1)
    vocab = PhonemeVocabulary()
    ids = vocab.text_to_ids(SENTENCES[1])
    waves = engine.synthesize_batch([SynthesisItem(vocab.text_to_ids(SENTENCES[0]), voice="en-us+m7"),
                                     *(SynthesisItem([VOCABULARY.index(t), *ids], voice="en-us+m7")
                                       for t in VOICE_TOKENS)])
    audio = [soxr.resample(w.samples, w.sample_rate_hertz, speaker.sample_rate).astype(np.float32)
             for w in waves if isinstance(w, Waveform)]
    embeddings = speaker.embed(audio)  # [1 + V, D] unit rows: the reference, then one per voice token
    cosine = dict(zip(VOICE_TOKENS, (embeddings[1:] @ embeddings[0]).tolist(), strict=True))
    assert cosine["+m7"] > 0.85, cosine
    assert all(c < cosine["+m7"] - 0.1 for t, c in cosine.items() if t != "+m7"), cosine


def test_cosyvoice2_without_its_folder_says_what_it_needs(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match="CosyVoice2 folder"):
        load_backend("cosyvoice2", BackendOptions(model_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="espeak-phonemes"):
        load_backend("nope", BackendOptions())


def test_served_on_loopback_answers_per_item() -> None:
    import io

    import grpc
    import soundfile

    from speechrl.services.ports import free_port
    from speechrl.services.token2wav.server import Token2WavConfig, start
    from speechrl.v1 import token2wav_pb2, token2wav_pb2_grpc
    from tests.support.servers import serve_in_thread

    ids = PhonemeVocabulary().text_to_ids("hello world")
    with serve_in_thread(lambda: start(Token2WavConfig(port=free_port()))) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = token2wav_pb2_grpc.Token2WavStub(channel)
            response = stub.Synthesize(token2wav_pb2.SynthesizeRequest(items=[
                token2wav_pb2.SynthesisItem(tokens=ids, voice="en-gb"), token2wav_pb2.SynthesisItem(tokens=[])]))
            with pytest.raises(grpc.RpcError) as error:
                stub.Synthesize(token2wav_pb2.SynthesizeRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first, second = response.results
    samples, rate = soundfile.read(io.BytesIO(first.audio.wav))
    assert rate == first.audio.sample_rate_hertz == 22050
    assert first.audio.duration_seconds == pytest.approx(len(samples) / rate)
    assert second.error.field == "items[1].tokens"


def test_score_tokens_served_with_a_trained_token2reward(tmp_path: object) -> None:
    """ScoreTokens on a real server with a small Token2Reward trained here: the right text scores
    above another sentence's, an empty sequence is unalignable (reward 0, not an error), a bad id
    fails alone, and a server without a checkpoint says what it needs."""
    from pathlib import Path

    import grpc
    import torch

    from speechrl.client import ServiceError, Token2WavClient
    from speechrl.services.ports import free_port
    from speechrl.services.token2wav import token2reward
    from speechrl.services.token2wav.server import Token2WavConfig, start
    from speechrl.trainer.recipes.token2reward import train
    from tests.support.servers import serve_in_thread
    from tests.support.token2reward_data import SENTENCES
    from tests.support.token2reward_data import tokens as _tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny model trains ~10x faster so on a loaded 2-core machine
    try:
        model = train([(_tokens(s), s) for s in SENTENCES], token2reward.Token2RewardConfig(
            num_tokens=16, d_model=48, layers=1, heads=2, upsample=2, dropout=0.0), steps=120, batch_size=6,
            learning_rate=1e-2)
    finally:
        torch.set_num_threads(threads)
    folder = Path(str(tmp_path)) / "t2r"
    token2reward.save(model, folder)
    tokens = [_tokens(s) for s in SENTENCES]
    with serve_in_thread(lambda: start(Token2WavConfig(port=free_port(), token2reward=str(folder)))) as running, \
            Token2WavClient(f"127.0.0.1:{running.port}") as client:
        right = client.score_tokens(tokens, SENTENCES)
        wrong = client.score_tokens(tokens, SENTENCES[1:] + SENTENCES[:1])
        edge = client.score_tokens([[], [1, 99]], ["the cat", "the cat"])
    for r, w in zip(right, wrong, strict=True):
        assert r.unwrap().alignable and r.unwrap().log_prob > w.unwrap().log_prob
        assert 0 <= w.unwrap().reward < r.unwrap().reward <= 1  # a longer wrong text may not align at all
        assert r.unwrap().reward == pytest.approx(np.exp(r.unwrap().log_prob / r.unwrap().num_chars))
    assert right[0].unwrap().num_chars == len("the cat sat")
    expected = model.log_prob_text(*token2reward.pad(tokens), SENTENCES)  # the server's numbers are the model's
    assert [r.unwrap().log_prob for r in right] == pytest.approx(expected.tolist(), abs=1e-3)
    empty, bad = edge
    assert empty.unwrap().alignable is False and empty.unwrap().reward == 0.0
    assert bad.error is not None and bad.error.field == "items[1].tokens"

    with serve_in_thread(lambda: start(Token2WavConfig(port=free_port()))) as running, \
            Token2WavClient(f"127.0.0.1:{running.port}") as client, pytest.raises(ServiceError) as error:
        client.score_tokens([[1]], ["a"])
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--token2reward" in str(error.value)
