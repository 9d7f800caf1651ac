"""A tiny random Qwen2 policy with an offline tokenizer, for tests and CPU smoke runs.

No model hub is reachable here, so tests (and the trainer's tiny runs) build their policy: a
Qwen2ForCausalLM with random weights and a byte-level BPE tokenizer trained offline on a word list,
saved with save_pretrained so that both transformers and vLLM load the folder like any checkpoint.

Head dim is 64 (vLLM's CPU attention supports it). Weights are drawn with a larger std than
Qwen2's 0.02 so that greedy decoding has clear argmax margins: with near-flat logits, two
runtimes' different float rounding would pick different tokens and no comparison would hold.

>>> import tempfile
>>> folder = build_tiny_qwen2(tempfile.mkdtemp(), speech_tokens=8)
>>> from transformers import AutoTokenizer
>>> tok = AutoTokenizer.from_pretrained(folder)
>>> tok.decode(tok("the cat sat")["input_ids"])
'the cat sat'
"""

from __future__ import annotations

from pathlib import Path

EOS_TOKEN = "<|endoftext|>"  # Qwen2's end-of-text token
PAD_TOKEN = "<|pad|>"
BPE_VOCAB_SIZE = 768  # 256 byte symbols, 2 specials, the rest merges of the corpus below

# The BPE training corpus: common English words, so text prompts and stop strings read naturally.
WORDS = (
    "the of and to a in is it you that he was for on are with as i his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children "
    "begin got walk example ease paper group always music those both mark often letter until mile river car "
    "feet care second book carry took science eat room friend began idea fish mountain stop once base hear horse "
    "cut sure watch color face wood main enough plain girl usual young ready above ever red list though feel "
    "talk bird soon body dog family direct pose leave song measure door product black short numeral class wind "
    "question happen complete ship area half rock order fire south problem piece told knew pass since top whole "
    "king space heard best hour better true during hundred five remember step early hold west ground interest "
    "reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against "
    "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit "
    "power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest "
    "correct able pound done beauty drive stood contain front teach week final gave green oh quick develop "
    "ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing "
    "course stay wheel full force blue object decide surface deep moon island foot system busy test record boat "
    "common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought "
    "heat snow tire bring yes distant fill east paint language among cat sat mat hello speech audio"
).split()


def speech_token(index: int) -> str:
    """The text of speech token index, e.g. <|s_3|>."""
    return f"<|s_{index}|>"


def _build_tokenizer(speech_tokens: int):  # -> a transformers fast tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same pipeline as Qwen2Tokenizer (NFC, Qwen's split regex, byte-level BPE): transformers
    # (and so vLLM) load any folder whose config says qwen2 with Qwen2Tokenizer, which rebuilds
    # exactly this pipeline around the saved vocab and merges.
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 12)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if speech_tokens:
        tokenizer.add_tokens([speech_token(i) for i in range(speech_tokens)])
    return tokenizer


def build_tiny_qwen2(folder: str | Path, *, hidden_size: int = 128, num_layers: int = 2,
                     speech_tokens: int = 0, max_position_embeddings: int = 512, init_std: float = 0.3,
                     seed: int = 0, tie_word_embeddings: bool = False) -> str:
    """Save a random Qwen2ForCausalLM and its byte-level BPE tokenizer in folder; returns the folder.

    hidden_size must be a multiple of 64 (head dim 64). speech_tokens appends that many
    `<|s_i|>` tokens to the vocabulary; their ids are [first_speech_id(folder), vocab size).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head dim 64), got {hidden_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(speech_tokens)
    heads = hidden_size // 64
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings, use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # float32, the default dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return str(folder)


def first_speech_id(folder: str | Path) -> int:
    """The id of <|s_0|> in a folder built with speech_tokens > 0."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    token_id = tokenizer.convert_tokens_to_ids(speech_token(0))
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{folder} has no speech tokens; build it with speech_tokens > 0")
    return token_id
