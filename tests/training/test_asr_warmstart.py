"""The small LLM-ASR: prompt layout, a tiny supervised warm start end to end, the checkpoint it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechrl.services.encoder.ct2 import build_ct2_frontend
from speechrl.trainer.jobs.datasets import read_manifest
from speechrl.trainer.models.asr_policy import (
    FRONTEND_DIR,
    IGNORE_INDEX,
    INSTRUCTION_TOKEN,
    AsrPolicy,
    PromptLayout,
    asr_inputs,
    build_asr_lm,
    build_asr_tokenizer,
    greedy_decode,
    load_frontend,
)
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.warmstart import (
    METRICS_FILE,
    WarmStartConfig,
    embed_rows,
    excess_repeats,
    frontend_key,
    load_clip,
    run_warmstart,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("warmstart")
    data = root / "data"
    build_asr_dataset(DataConfig(out=str(data), seed=1, train=12, dev=3, test=3, voices="en-us", joined=0,
                                 long_test=0), progress=False)
    frontend = build_ct2_frontend(root / "frontend", HIDDEN, adaptor_hidden_size=128)
    config = WarmStartConfig(data=str(data), out=str(root / "ckpt"), frontend=str(frontend), hidden_size=HIDDEN,
                             num_layers=1, epochs=1, batch_size=2, learning_rate=5e-3, warmup_steps=1,
                             eval_splits="dev,test")
    return data, root / "ckpt", run_warmstart(config)


def test_tiny_warm_start_learns_and_saves(run: tuple[Path, Path, dict]) -> None:
    data, ckpt, summary = run
    training = summary["training"]
    assert training["steps"] == 6 and training["last_loss"] < training["first_loss"] - 0.5
    assert set(summary["eval"]) == {"dev", "test"}
    for split in ("dev", "test"):
        metrics = summary["eval"][split]
        assert metrics["utterances"] == 3 and metrics["wer"] >= 0
        records = [json.loads(line) for line in (ckpt / "hypotheses" / f"{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == [r.id for r in read_manifest(data, split)]
    assert json.loads((ckpt / METRICS_FILE).read_text())["training"]["steps"] == 6
    assert (ckpt / FRONTEND_DIR / "adaptor.safetensors").exists() and (ckpt / FRONTEND_DIR / "ct2_encoder.json").exists()
    cached = list((data / "embeddings").glob("*/train.safetensors"))
    assert len(cached) == 1 and cached[0].parent.name == frontend_key(ckpt / FRONTEND_DIR)


def test_checkpoint_loads_with_transformers_and_transcribes(run: tuple[Path, Path, dict]) -> None:
    data, ckpt, _ = run
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    layout = PromptLayout.load(ckpt)
    assert layout.instruction_ids == (tokenizer.convert_tokens_to_ids(INSTRUCTION_TOKEN),)
    assert layout.hidden_size == HIDDEN == model.config.hidden_size
    frontend = load_frontend(ckpt)  # the checkpoint's own copy of the front-end
    rows = read_manifest(data, "test")
    audio = frontend.encode([load_clip(r, frontend.sample_rate) for r in rows])  # [T_i, D] each
    prompts = asr_inputs(model.get_input_embeddings(), audio, layout.instruction_ids, padding_side="left")
    with torch.inference_mode():
        ours = greedy_decode(model, prompts, [12] * len(rows), layout.eos_token_id)
        # transformers' own greedy generate on the same left-padded prompt embeddings agrees token for token.
        theirs = model.generate(inputs_embeds=prompts.inputs_embeds, attention_mask=prompts.attention_mask,
                                max_new_tokens=12, do_sample=False)
    for mine, generated in zip(ours, theirs.tolist(), strict=True):
        assert generated[:len(mine)] == mine
    texts = AsrPolicy.load(ckpt).transcribe(audio)
    assert all(isinstance(t, str) for t in texts) and any(texts)
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in ours] or \
        any(len(ids) == 12 for ids in ours), "transcribe's budget is longer than 12 tokens"


def test_prompt_layout_shapes_and_label_masking() -> None:
    tokenizer = build_asr_tokenizer(["grace moved the red box", "bob sold two cups"])
    policy = AsrPolicy.create(tokenizer, build_asr_lm(tokenizer, hidden_size=HIDDEN, num_layers=1), 12.5)
    audio = [torch.randn(5, HIDDEN), torch.randn(2, HIDDEN)]
    texts = ["grace moved the red box", "bob sold two cups"]
    batch = policy.inputs(audio, texts)
    targets = [policy.completion_ids(t) for t in texts]
    assert targets[0][-1] == policy.layout.eos_token_id and tokenizer.decode(targets[1][:-1]).strip() == texts[1]
    lengths = [5 + 1 + len(targets[0]), 2 + 1 + len(targets[1])]
    assert batch.inputs_embeds.shape == (2, max(lengths), HIDDEN) and batch.labels is not None
    assert batch.attention_mask.sum(1).tolist() == lengths and batch.prompt_lengths.tolist() == [6, 3]
    for row, (prompt, ids) in enumerate(zip([6, 3], targets, strict=True)):
        labels = batch.labels[row].tolist()
        assert labels[:prompt] == [IGNORE_INDEX] * prompt, "audio and instruction are never targets"
        assert labels[prompt:prompt + len(ids)] == ids
        assert set(labels[prompt + len(ids):]) <= {IGNORE_INDEX}, "padding is never a target"
        # The instruction sits right after the audio, as its token embedding.
        torch.testing.assert_close(batch.inputs_embeds[row, prompt - 1],
                                   policy.model.get_input_embeddings().weight[policy.layout.instruction_ids[0]])
        torch.testing.assert_close(batch.inputs_embeds[row, : prompt - 1], audio[row])
    assert batch.position_ids[1, :lengths[1]].tolist() == list(range(lengths[1]))
    # Left padding (generation) keeps each row's positions counting from 0 at its first real position.
    left = policy.inputs(audio, padding_side="left")
    assert left.labels is None and left.attention_mask.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert left.position_ids[1].tolist() == [0, 0, 0, 0, 1, 2]
    torch.testing.assert_close(left.inputs_embeds[1, 3:5], audio[1])
    # Loss only over completion tokens: equal to the mean cross-entropy computed by hand.
    logits = policy.model(**batch.model_inputs()).logits  # [B, L, V]
    loss = policy.model(**batch.model_inputs()).loss
    shifted, wanted = logits[:, :-1], batch.labels[:, 1:]  # position t predicts label t + 1
    keep = wanted != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(shifted[keep], wanted[keep])
    torch.testing.assert_close(loss, manual)


def test_embedding_cache_and_repeat_metric(run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    data, ckpt, _ = run
    frontend = load_frontend(ckpt)
    rows = read_manifest(data, "dev")
    first = embed_rows(frontend, rows, tmp_path / "dev.safetensors")
    again = embed_rows(frontend, rows[:1], tmp_path / "dev.safetensors")  # from the cache file alone
    torch.testing.assert_close(again[rows[0].id], first[rows[0].id])
    assert first[rows[0].id].shape[1] == HIDDEN
    assert excess_repeats("grace moved the box grace moved the box", "grace moved the box") == 1
    assert excess_repeats("one two three four", "one two three four one two three four") == 0
