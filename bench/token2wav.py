"""token2wav rendering speed: the espeak-phonemes backend and the cosyvoice2 backend at CosyVoice2-0.5B's
sizes (random weights from its cosyvoice2.yaml's sizes, token2wav/random_cosyvoice2.py: no hub here).

    python bench/token2wav.py [--device cuda:0]

For each backend: the seconds to render sequences of 2, 5 and 10 s of audio one at a time (after one
warm-up render) and its real-time factor (render seconds per audio second, lower is faster), and a GRPO
group (8 sequences of 5 s, one batch). cosyvoice2 also: its parameters, load time, and the prompt
speaker's features (first time; later items of the same prompt hit the cache). Random weights compute
exactly what trained ones do, so the times are the real model's on this machine; the audio is noise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sections import write_section

from speechrl.services.token2wav.backends import BackendOptions, SynthesisItem, Token2WavBackend, load_backend
from speechrl.services.token2wav.random_cosyvoice2 import COSYVOICE2_05B, build_token2wav_folder
from speechrl.services.token2wav.tokens import PhonemeVocabulary

SECONDS = (2, 5, 10)
GROUP = 8
COSYVOICE2_TOKENS_PER_SECOND = 25
SENTENCE = ("The weather today is sunny with a light breeze from the west, and the evening should stay dry "
            "and mild until late in the night when clouds come in from the sea.")


def timed(backend: Token2WavBackend, items: list[SynthesisItem]) -> tuple[float, float]:
    """(render seconds, audio seconds) of one synthesize call."""
    start = time.perf_counter()
    waves = backend.synthesize(items)
    elapsed = time.perf_counter() - start
    audio = 0.0
    for wave in waves:
        if isinstance(wave, Exception):
            raise wave
        audio += len(wave.samples) / wave.sample_rate_hertz
    return elapsed, audio


def rows(name: str, backend: Token2WavBackend, items_of: dict[int, SynthesisItem]) -> list[str]:
    """Table rows: one sequence per length, then a group of GROUP 5 s sequences in one batch."""
    timed(backend, [items_of[SECONDS[0]]])  # warm-up: first-call allocations, lazy imports
    out = []
    for seconds in SECONDS:
        elapsed, audio = timed(backend, [items_of[seconds]])
        out.append(f"| {name} | 1 x {audio:.1f} s | {elapsed:.2f} | {elapsed / audio:.2f} |")
    elapsed, audio = timed(backend, [items_of[5]] * GROUP)
    out.append(f"| {name} | {GROUP} x {audio / GROUP:.1f} s (a group, one batch) | {elapsed:.2f} | {elapsed / audio:.2f} |")
    return out


def espeak_items() -> dict[int, SynthesisItem]:
    """Phoneme tokens of the sentence's first words, as many as give about each length at 160 wpm."""
    words = SENTENCE.split()
    vocabulary = PhonemeVocabulary()
    return {s: SynthesisItem(vocabulary.text_to_ids(" ".join(words[:max(1, round(s * 160 / 60))]))) for s in SECONDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    lines = ["| backend | sequences | render s | real-time factor |", "|---|---|---|---|"]
    lines += rows("espeak-phonemes", load_backend("espeak-phonemes", BackendOptions()), espeak_items())
    with tempfile.TemporaryDirectory() as root:
        folder = build_token2wav_folder(Path(root) / "CosyVoice2", COSYVOICE2_05B)
        start = time.perf_counter()
        backend = load_backend("cosyvoice2", BackendOptions(model_dir=str(folder), device=args.device))
        for module in backend.modules():  # as the service's residency does under the lease
            module.to(args.device)
        loaded = time.perf_counter() - start
        prompt = subprocess.run(["espeak-ng", "--stdout", SENTENCE], capture_output=True, check=True).stdout
        start = time.perf_counter()
        backend.prompt_features(prompt)  # type: ignore[attr-defined]
        features = time.perf_counter() - start
        tokens = torch.randint(0, backend.num_tokens, (COSYVOICE2_TOKENS_PER_SECOND * max(SECONDS),)).tolist()
        lines += rows("cosyvoice2", backend, {s: SynthesisItem(tokens[:COSYVOICE2_TOKENS_PER_SECOND * s],
                                                               prompt_audio=prompt) for s in SECONDS})
        flow, hift = (sum(p.numel() for p in m.parameters()) / 1e6 for m in backend.modules())
    body = (f"Device: {args.device}; torch threads {torch.get_num_threads()}.\n\n" + "\n".join(lines) + "\n\n"
            f"cosyvoice2 at CosyVoice2-0.5B's sizes: flow {flow:.1f}M and HiFT {hift:.1f}M parameters, "
            f"{'float16 flow' if args.device.startswith('cuda') else 'float32'}; loaded in {loaded:.1f} s; a new "
            f"prompt speaker's features (speech tokens, mel, speaker embedding) {features * 1000:.0f} ms, then "
            "cached. Its random ONNX stand-ins are cheaper than the real campplus and speech tokenizer, which run "
            "once per prompt speaker.")
    print(body)
    write_section("token2wav", "token2wav rendering speed (bench/token2wav.py)", body)


if __name__ == "__main__":
    main()
