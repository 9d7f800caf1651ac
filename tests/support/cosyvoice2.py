"""A tiny random CosyVoice2 LLM in the original checkpoint's layout, and its original forward.

`build_cosyvoice2_folder` writes what a CosyVoice2-0.5B folder holds for its LLM: `llm.pt` (the
state dict of cosyvoice/llm/llm.py's Qwen2LM: `llm.model.*` of a Qwen2ForCausalLM, `llm_embedding`,
`speech_embedding`, `llm_decoder` with its bias) and `CosyVoice-BlankEN/` (the Qwen2 config and
tokenizer its Qwen2Encoder loads). `OriginalLLM` computes what Qwen2LM computes from that state dict,
written from its source (the package is not installable here): the reference the converter is held to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from speechrl.services.rollout.tiny import _build_tokenizer


class _Encoder(nn.Module):
    """Qwen2LM's Qwen2Encoder: the Qwen2ForCausalLM under `.model`."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(config)


class OriginalLLM(nn.Module):
    """Qwen2LM's modules under Qwen2LM's names, and its forward for unistream synthesis."""

    def __init__(self, config: Qwen2Config, num_speech: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_speech = num_speech
        self.llm_embedding = nn.Embedding(2, hidden)  # sos 0, task_id 1
        self.llm = _Encoder(config)
        self.llm_decoder = nn.Linear(hidden, num_speech + 3)  # speech, eos, two fills; with a bias
        self.speech_embedding = nn.Embedding(num_speech + 3, hidden)

    def log_probs(self, text_ids: list[int], speech_ids: list[int]) -> torch.Tensor:
        """log_softmax(llm_decoder(h)) [len(speech_ids) + 1, K + 3] at each speech position and the next.

        Qwen2LM.inference: lm_input = [sos, embed_tokens(text), task_id, speech_embedding(prompt speech)],
        then Qwen2Encoder's last hidden state (output_hidden_states), then llm_decoder.
        """
        text = self.llm.model.model.embed_tokens(torch.tensor([text_ids]))  # [1, N, D]
        speech = self.speech_embedding(torch.tensor([speech_ids], dtype=torch.long))  # [1, S, D]
        sos, task = self.llm_embedding.weight[0].reshape(1, 1, -1), self.llm_embedding.weight[1].reshape(1, 1, -1)
        inputs = torch.cat([sos, text, task, speech], dim=1)  # [1, N + S + 2, D]
        hidden = self.llm.model(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1]  # [1, L, D]
        return self.llm_decoder(hidden[0, len(text_ids) + 1:]).log_softmax(-1)  # [S + 1, K + 3]

    @torch.no_grad()
    def greedy(self, text_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy speech tokens until eos, over the ids the rollout service samples: speech and eos (the
        fill tokens, which only bistream synthesis emits on purpose, are never sampled there)."""
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(self.log_probs(text_ids, out)[-1, :self.num_speech + 1].argmax())
            if token == self.num_speech:
                break
            out.append(token)
        return out


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 2, tie: bool = True) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                       max_position_embeddings=512, tie_word_embeddings=tie, use_sliding_window=False)


def build_cosyvoice2_folder(folder: str | Path, num_speech: int, *, hidden: int = 64, layers: int = 2,
                            tie: bool = True, seed: int = 0, init_std: float = 0.2) -> OriginalLLM:
    """Write llm.pt and CosyVoice-BlankEN/ of a random CosyVoice2 LLM into folder; returns the module."""
    folder = Path(folder)
    tokenizer = _build_tokenizer(0)
    # Qwen2.5's embedding has rows beyond its tokenizer (151936 for 151665 tokens): room for CosyVoice2's specials.
    config = tiny_config(len(tokenizer) + 32, hidden, layers, tie)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = OriginalLLM(config, num_speech)
    with torch.no_grad():  # CosyVoice2's own modules at the Qwen2's scale; a non-zero head bias, which must survive
        for module in (model.llm_embedding, model.speech_embedding, model.llm_decoder):
            for parameter in module.parameters():
                parameter.normal_(0.0, init_std)
    (folder / "CosyVoice-BlankEN").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder / "CosyVoice-BlankEN")
    tokenizer.save_pretrained(folder / "CosyVoice-BlankEN")
    torch.save(model.state_dict(), folder / "llm.pt")
    return model.eval()


def load_original(folder: str | Path, num_speech: int, tie: bool = True, hidden: int = 64,
                  layers: int = 2) -> OriginalLLM:
    """An llm.pt loaded back into the original layout, strictly (as CosyVoice2 loads it)."""
    state = torch.load(Path(folder), map_location="cpu", weights_only=True)
    vocab = state["llm.model.model.embed_tokens.weight"].shape[0]
    model = OriginalLLM(tiny_config(vocab, hidden, layers, tie), num_speech)
    model.load_state_dict(state, strict=True)
    return model.eval()
