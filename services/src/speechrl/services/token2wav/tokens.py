"""Speech tokens that run here: espeak-ng's phoneme mnemonics (en-us), one token each, and voice tokens.

A token sequence is what `espeak-ng -x --sep=|` writes, split: a word boundary " ", stress marks
("'" primary, "," secondary) as their own tokens before the phoneme they stress, and the phonemes
of PHONEMES. espeak renders it back from its phoneme input, [[h@l'oU w'3:ld]], so every token
has a sound and the policy's job is to pick the right ones.

Voice tokens (VOICE_TOKENS, one per espeak-ng voice variant of VOICE_VARIANTS) let the tokens carry
the voice, as a codec's tokens carry the speaker's timbre: a voice token is silent, and the first one
in a sequence replaces the variant of the speaker prompt's voice ("+m3" spoken with prompt voice
"en-gb+m7" renders as "en-gb+m3"); a sequence without one is spoken in the prompt's voice, as before
they existed. They come after the phonemes in the id order, so every earlier id keeps its meaning.

Token ids are positions in VOCABULARY (0..len-1); a policy holds them at [offset, offset + len).

>>> vocab = PhonemeVocabulary()
>>> ids = vocab.text_to_ids("hello world")
>>> vocab.ids_to_phonemes(ids)
"h@l'oU w'3:ld"
>>> voiced = [VOCABULARY.index("+m3"), *ids]
>>> vocab.ids_to_phonemes(voiced), vocab.spoken_voice(voiced, "en-gb+m7"), vocab.spoken_voice(ids, "en-gb+m7")
("h@l'oU w'3:ld", 'en-gb+m3', 'en-gb+m7')
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from speechrl.services.espeak import espeak_binary

WORD_BOUNDARY, PRIMARY_STRESS, SECONDARY_STRESS = " ", "'", ","
# espeak-ng 1.51 en-us phonemes (mnemonics of its phoneme tables), gathered from its -x output over
# sentences covering English; "_:" is a short pause. Order is the id order: never reorder, only append.
PHONEMES = (
    "_:", "@", "@-", "@2", "@5", "@L", "3", "3:", "0", "0#", "A:", "A@", "D", "E", "I", "I#", "I2", "N", "O2", "O:",
    "O@", "OI", "S", "T", "U", "U@", "V", "Z", "a", "a#", "aa", "aI", "aI@", "aU", "aU@", "b", "d", "dZ", "e", "e@",
    "eI", "f", "g", "h", "i", "i:", "i@", "i@3", "j", "k", "l", "m", "n", "n-", "o@", "oU", "p", "r", "s", "t", "t#",
    "tS", "u:", "v", "w", "x", "z", "?", ";", "l-", "r-", "m-",
)
# espeak-ng voice variants (`espeak-ng --voices=variant`) that voice tokens name. Measured on 30 template
# sentences: Resemblyzer's cosine to a reference sentence in en-us+m7 (the TTS reproduction's prompt
# voice) is m1 0.68, m3 0.70, m6 0.69, m7 0.90, so a speaker reward can tell them; Whisper tiny.en's
# WER is alike (0.37, 0.39, 0.35, 0.35), so an intelligibility reward alone has no voice to prefer
# (the female variants' WER is 0.44-0.61: they would be one).
VOICE_VARIANTS = ("m1", "m3", "m6", "m7")
VOICE_TOKENS = tuple(f"+{variant}" for variant in VOICE_VARIANTS)
SPOKEN = (WORD_BOUNDARY, PRIMARY_STRESS, SECONDARY_STRESS, *PHONEMES)
VOCABULARY = (*SPOKEN, *VOICE_TOKENS)


class PhonemeVocabulary:
    """Text -> espeak phonemes -> token ids, and ids -> espeak's phoneme-input string."""

    def __init__(self, voice: str = "en-us"):
        self.voice = voice
        self.index = {symbol: i for i, symbol in enumerate(SPOKEN)}  # what espeak's -x output can name

    def __len__(self) -> int:
        return len(VOCABULARY)

    def phonemize(self, text: str) -> list[str]:
        """espeak-ng's phoneme tokens of text (clauses joined by a word boundary); unknown symbols dropped."""
        out = subprocess.run([espeak_binary(), "-q", "-x", "--sep=|", "-v", self.voice, text], check=True,
                             capture_output=True, text=True).stdout
        symbols: list[str] = []
        for word in out.split():
            if symbols:
                symbols.append(WORD_BOUNDARY)
            for phoneme in word.split("|"):
                while phoneme[:1] in (PRIMARY_STRESS, SECONDARY_STRESS):
                    symbols.append(phoneme[0])
                    phoneme = phoneme[1:]
                if phoneme in self.index:
                    symbols.append(phoneme)
        return symbols

    def text_to_ids(self, text: str) -> list[int]:
        """Token ids (0-based) of text's phonemes."""
        return [self.index[s] for s in self.phonemize(text)]

    def ids_to_phonemes(self, ids: Sequence[int]) -> str:
        """espeak's phoneme mnemonics of ids, for its [[...]] input; ids outside the vocabulary are skipped.

        Phonemes of one word are written together: espeak splits a run of mnemonics itself, longest
        match first, which is how its own -x output reads back.
        """
        return "".join(SPOKEN[i] for i in ids if 0 <= i < len(SPOKEN)).strip()

    def spoken_voice(self, ids: Sequence[int], prompt_voice: str) -> str:
        """The espeak voice ids are spoken in: prompt_voice with its variant replaced by the first voice
        token's (a "+variant" suffix added or swapped), or prompt_voice when ids hold no voice token."""
        for i in ids:
            if len(SPOKEN) <= i < len(VOCABULARY):
                return f"{prompt_voice.partition('+')[0]}{VOCABULARY[i]}"
        return prompt_voice
