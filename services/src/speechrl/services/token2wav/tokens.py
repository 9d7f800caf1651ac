"""Speech tokens that run here: espeak-ng's phoneme mnemonics (en-us), one token each.

A token sequence is what `espeak-ng -x --sep=|` writes, split: a word boundary " ", stress marks
("'" primary, "," secondary) as their own tokens before the phoneme they stress, and the phonemes
of PHONEMES. espeak renders it back from its phoneme input, [[h@l'oU w'3:ld]], so every token
has a sound and the policy's job is to pick the right ones.

Token ids are positions in VOCABULARY (0..len-1); a policy holds them at [offset, offset + len).

>>> vocab = PhonemeVocabulary()
>>> ids = vocab.text_to_ids("hello world")
>>> vocab.ids_to_phonemes(ids)
"h@l'oU w'3:ld"
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

WORD_BOUNDARY, PRIMARY_STRESS, SECONDARY_STRESS = " ", "'", ","
# espeak-ng 1.51 en-us phonemes (mnemonics of its phoneme tables), gathered from its -x output over
# sentences covering English; "_:" is a short pause. Order is the id order: never reorder, only append.
PHONEMES = (
    "_:", "@", "@-", "@2", "@5", "@L", "3", "3:", "0", "0#", "A:", "A@", "D", "E", "I", "I#", "I2", "N", "O2", "O:",
    "O@", "OI", "S", "T", "U", "U@", "V", "Z", "a", "a#", "aa", "aI", "aI@", "aU", "aU@", "b", "d", "dZ", "e", "e@",
    "eI", "f", "g", "h", "i", "i:", "i@", "i@3", "j", "k", "l", "m", "n", "n-", "o@", "oU", "p", "r", "s", "t", "t#",
    "tS", "u:", "v", "w", "x", "z", "?", ";", "l-", "r-", "m-",
)
VOCABULARY = (WORD_BOUNDARY, PRIMARY_STRESS, SECONDARY_STRESS, *PHONEMES)


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/bootstrap.sh (apt-get install espeak-ng)")
    return path


class PhonemeVocabulary:
    """Text -> espeak phonemes -> token ids, and ids -> espeak's phoneme-input string."""

    def __init__(self, voice: str = "en-us"):
        self.voice = voice
        self.index = {symbol: i for i, symbol in enumerate(VOCABULARY)}

    def __len__(self) -> int:
        return len(VOCABULARY)

    def phonemize(self, text: str) -> list[str]:
        """espeak-ng's phoneme tokens of text (clauses joined by a word boundary); unknown symbols dropped."""
        out = subprocess.run([_espeak(), "-q", "-x", "--sep=|", "-v", self.voice, text], check=True,
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
        return "".join(VOCABULARY[i] for i in ids if 0 <= i < len(VOCABULARY)).strip()
