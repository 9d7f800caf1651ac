"""Token2Reward (DiffRO's token-input reward model): soft = hard input, training, save/load, the CLI (issue 7)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speechrl.services.token2wav import token2reward
from speechrl.services.token2wav.token2reward import Token2Reward, Token2RewardConfig, encode_text, pad
from speechrl.trainer.models.token2reward import diffro_reward
from speechrl.trainer.recipes import token2reward as token2reward_training
from speechrl.trainer.recipes.token2reward import train
from tests.support.token2reward_data import SENTENCES
from tests.support.token2reward_data import tokens as _tokens


def test_encode_text_keeps_letters_spaces_and_apostrophes() -> None:
    assert encode_text("It's  OK!") == [token2reward.ALPHABET.index(c) + 1 for c in "it's ok"]
    assert encode_text("...") == []


def test_soft_one_hot_input_equals_hard_input() -> None:
    model = Token2Reward(Token2RewardConfig(num_tokens=16, d_model=32, layers=1, heads=2)).eval()
    tokens, mask = pad([_tokens("the cat sat"), _tokens("dog")])  # [2, T]
    hard = model(tokens, mask)  # [2, T*U, C]
    soft = model(F.one_hot(tokens, 16).float(), mask)
    assert torch.allclose(hard, soft, atol=1e-5)
    texts = ["the cat sat", "dog"]
    assert torch.allclose(model.log_prob_text(tokens, mask, texts),
                          model.log_prob_text(F.one_hot(tokens, 16).float(), mask, texts), atol=1e-4)


def test_soft_input_carries_gradient_to_the_distribution() -> None:
    model = Token2Reward(Token2RewardConfig(num_tokens=16, d_model=32, layers=1, heads=2)).eval()
    tokens, mask = pad([_tokens("the cat")])
    probs = F.one_hot(tokens, 16).float().requires_grad_(True)  # [1, T, 16]
    model.log_prob_text(probs, mask, ["the cat"]).sum().backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: this tiny model trains 10x faster so on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_trained_model_prefers_the_right_text_and_survives_save_load(tmp_path: Path) -> None:
    pairs = [(_tokens(s), s) for s in SENTENCES]
    config = Token2RewardConfig(num_tokens=16, d_model=48, layers=1, heads=2, upsample=2, dropout=0.0)
    model = train(pairs, config, steps=120, batch_size=6, learning_rate=1e-2)
    tokens, mask = pad([_tokens(s) for s in SENTENCES])
    right = model.log_prob_text(tokens, mask, SENTENCES)  # [6]
    wrong = model.log_prob_text(tokens, mask, SENTENCES[1:] + SENTENCES[:1])  # [6] each paired with another's text
    assert (right > wrong).all(), (right, wrong)
    assert (right > -5).all()  # close to the text, not just less wrong

    loaded = token2reward.load(token2reward.save(model, tmp_path / "t2r").parent)
    assert torch.allclose(loaded.log_prob_text(tokens, mask, SENTENCES), right, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_augment_calibrates_the_model_on_the_tokens_it_writes() -> None:
    """Trained on augment's noised tokens (30 % substituted, fresh every draw, the text kept), the model still
    gives a noisy sequence its text (log P ~ -7 nats here), where the model trained on the clean pairs alone
    never saw such input and scores it ~-140: the reward DiffRO differentiates where a policy samples."""
    def noise(tokens: Sequence[int], rng: random.Random) -> list[int]:
        return [rng.randrange(1, 15) if rng.random() < 0.3 else t for t in tokens]

    pairs = [(_tokens(s), s) for s in SENTENCES]
    config = Token2RewardConfig(num_tokens=16, d_model=48, layers=1, heads=2, upsample=2, dropout=0.0)
    clean = train(pairs, config, steps=120, batch_size=6, learning_rate=1e-2)
    noised = train(pairs, config, steps=120, batch_size=6, learning_rate=1e-2, augment=noise)
    rng = random.Random(100)
    texts = [s for s in SENTENCES for _ in range(4)]
    tokens, mask = pad([noise(_tokens(s), rng) for s in texts])  # [24, T]
    with torch.no_grad():
        assert noised.log_prob_text(tokens, mask, texts).mean() > clean.log_prob_text(tokens, mask, texts).mean() + 50


def test_diffro_reward_reads_the_speech_range_of_a_policy_vocabulary() -> None:
    model = Token2Reward(Token2RewardConfig(num_tokens=16, d_model=32, layers=1, heads=2)).eval()
    offset = 100
    tokens, mask = pad([_tokens("the cat"), _tokens("dog")])  # [2, T]
    one_hot = F.one_hot(tokens, 16).float() * mask[..., None]  # [2, T, K] the speech range's part
    # Right-padded here but left-padded in the policy's batch: the reward aligns either.
    left = torch.stack([one_hot[0], torch.roll(one_hot[1], shifts=int((~mask[1]).sum()), dims=0)])
    left_mask = torch.stack([mask[0], torch.roll(mask[1], shifts=int((~mask[1]).sum()), dims=0)])
    reward = diffro_reward(model, ["the cat", "dog"], (offset, offset + 16), (1,))
    assert reward.speech_range == (100, 116) and reward.stop_ids == (1,)
    assert torch.allclose(reward.score(left, left_mask, torch.tensor([0, 1])),
                          model.log_prob_text(tokens, mask, ["the cat", "dog"]), atol=1e-4)
    with pytest.raises(ValueError, match="embeds 16"):
        diffro_reward(model, ["x"], (offset, offset + 15))


def test_cli_trains_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": _tokens(s), "text": s}) for s in SENTENCES))
    token2reward_training.main(["--data", str(data), "--out", str(tmp_path / "out"), "--steps", "3", "--d-model", "32",
                       "--layers", "1"])
    assert "saved" in capsys.readouterr().out
    assert token2reward.load(tmp_path / "out").config.num_tokens == 15
