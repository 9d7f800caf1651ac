"""CosyVoice2's llm.pt <-> a CosyVoice2ForCausalLM folder (issue 20): the round trip gives every tensor back,
the converted model's distribution is the original module's, and broken inputs are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from speechrl.services.cosyvoice2 import CosyVoice2Layout, import_llm, is_cosyvoice2, main
from speechrl.trainer.models.tts_policy import TtsPolicy
from tests.support.cosyvoice2 import build_cosyvoice2_folder

NUM_SPEECH = 40
TEXT = "hello world the cat sat"


@pytest.mark.parametrize("tie", [True, False])
def test_llm_pt_round_trips_tensor_for_tensor(tmp_path: Path, tie: bool) -> None:
    build_cosyvoice2_folder(tmp_path / "cosyvoice2", NUM_SPEECH, tie=tie)
    main(["import", str(tmp_path / "cosyvoice2"), str(tmp_path / "policy")])
    main(["export", str(tmp_path / "policy"), str(tmp_path / "llm.pt")])
    original = torch.load(tmp_path / "cosyvoice2" / "llm.pt", weights_only=True)
    back = torch.load(tmp_path / "llm.pt", weights_only=True)
    assert sorted(back) == sorted(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)
    head, embedding = back["llm.model.lm_head.weight"], back["llm.model.model.embed_tokens.weight"]
    assert (head.data_ptr() == embedding.data_ptr()) == tie  # a tied head stays tied, as CosyVoice saves it


def test_converted_model_is_the_original_distribution(tmp_path: Path) -> None:
    original = build_cosyvoice2_folder(tmp_path / "cosyvoice2", NUM_SPEECH)
    assert original.llm_decoder.bias.abs().min() > 0  # the bias is real, so dropping it would show
    folder = import_llm(tmp_path / "cosyvoice2", tmp_path / "policy")
    policy = TtsPolicy.load(folder)
    layout = policy.layout
    assert isinstance(layout, CosyVoice2Layout) and is_cosyvoice2(folder)
    text, speech = layout.text_ids(TEXT), [3, 0, 17, NUM_SPEECH - 1]
    ids = torch.tensor([layout.prompt_ids(TEXT) + [t + layout.speech_offset for t in speech]])  # [1, L]
    with torch.no_grad():
        converted = policy.model(ids).logits[0, len(text) + 1:].log_softmax(-1)  # [S + 1, V]
        reference = original.log_probs(text, speech)  # [S + 1, K + 3]
    begin = layout.speech_offset
    torch.testing.assert_close(converted[:, begin:begin + NUM_SPEECH + 3], reference, rtol=0, atol=1e-5)
    assert converted[:, :begin].exp().sum() == 0 and converted[:, -2:].exp().sum() == 0  # text, sos, task: never
    # AutoModelForCausalLM builds a plain Qwen2 and drops the bias: why the services load it by architecture.
    plain = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits[0, len(text) + 1:].log_softmax(-1)[:, begin:begin + NUM_SPEECH],
                                  reference[:, :NUM_SPEECH], atol=1e-3)


def test_the_layout_is_cosyvoice2s_prompt(tmp_path: Path) -> None:
    build_cosyvoice2_folder(tmp_path / "cosyvoice2", NUM_SPEECH)
    layout = CosyVoice2Layout.load(import_llm(tmp_path / "cosyvoice2", tmp_path / "policy"))
    t = layout.text_rows
    assert layout.speech_range() == (t, t + NUM_SPEECH) and layout.eos_id == t + NUM_SPEECH
    assert (layout.sos_id, layout.task_id, layout.vocab_size) == (t + NUM_SPEECH + 3, t + NUM_SPEECH + 4,
                                                                   t + NUM_SPEECH + 5)
    prompt = layout.prompt_ids("[breath] hello")
    assert prompt[0] == layout.sos_id and prompt[-1] == layout.task_id
    assert prompt[1] == layout.tokenizer.convert_tokens_to_ids("[breath]")  # CosyVoice2's specials are single tokens
    assert layout.speech_tokens([t + 4, t - 1, t + NUM_SPEECH, t]) == [4, 0]


def test_broken_checkpoints_are_named(tmp_path: Path) -> None:
    build_cosyvoice2_folder(tmp_path / "cosyvoice2", NUM_SPEECH)
    state = torch.load(tmp_path / "cosyvoice2" / "llm.pt", weights_only=True)
    with pytest.raises(FileNotFoundError, match="CosyVoice-BlankEN"):
        import_llm(tmp_path, tmp_path / "out")
    del state["llm_decoder.bias"]
    state["flow.encoder.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "cosyvoice2" / "llm.pt")
    with pytest.raises(ValueError, match=r"lacks \['llm_decoder.bias'\]"):
        import_llm(tmp_path / "cosyvoice2", tmp_path / "out")
    state["llm_decoder.bias"] = torch.zeros(NUM_SPEECH + 3)
    torch.save(state, tmp_path / "cosyvoice2" / "llm.pt")
    with pytest.raises(ValueError, match="flow.encoder.weight"):
        import_llm(tmp_path / "cosyvoice2", tmp_path / "out")
