"""Score generated speech with the running scorers and plot it (the scorers' own demo).

    speechrl score-demo [--out runs/score-demo] [--keep-running]

Speaks a few sentences with several espeak-ng voices, then through the running services:
transcribes each and scores it against the right and a wrong reference (intelligibility),
compares every voice with every other (speaker similarity), and applies the rule rewards to the
transcripts and to a looping hallucination. Writes a table to stdout and runs/demo/demo.png.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speechrl.client import IntelligibilityClient, RuleRewardsClient, SpeakerClient
from speechrl.services import stack
from speechrl.services.espeak import EspeakSynthesizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Reinforcement learning improves speech recognition on hard cases.",
    "Please turn on the kitchen lights before dinner.",
    "The weather in Paris will be sunny tomorrow afternoon.",
]
VOICES = ["en-us", "en-gb-scotland", "en-us+f3", "en-us+m7"]


def plot(path: Path, wer_right: np.ndarray, wer_wrong: np.ndarray, similarity: np.ndarray) -> None:
    """Left: WER per voice with the right vs a wrong reference. Right: voice-to-voice similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(VOICES))
    left.bar(x - 0.2, wer_right.mean(axis=1), 0.4, label="right reference")
    left.bar(x + 0.2, wer_wrong.mean(axis=1), 0.4, label="wrong reference")
    left.set_xticks(x, VOICES, rotation=20)
    left.set_ylabel("mean WER (Whisper tiny.en)")
    left.set_title("Intelligibility scorer")
    left.legend()
    image = right.imshow(similarity, vmin=0, vmax=1, cmap="Blues")
    right.set_xticks(x, VOICES, rotation=20)
    right.set_yticks(x, VOICES)
    for i in range(len(VOICES)):
        for j in range(len(VOICES)):
            right.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=9,
                       color="white" if similarity[i, j] > 0.6 else "black")
    right.set_title("Speaker similarity (cosine, other sentence)")
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(out: Path) -> None:
    synth = EspeakSynthesizer(out / "speech")
    wavs = {(v, s): synth.path(text, voice=v) for v in VOICES for s, text in enumerate(SENTENCES)}
    n = len(SENTENCES)
    with IntelligibilityClient(timeout_s=120) as asr, SpeakerClient(timeout_s=120) as spk, \
            RuleRewardsClient(timeout_s=30) as rules:
        start = time.perf_counter()
        keys = list(wavs)
        right = asr.score([wavs[k] for k in keys], [SENTENCES[s] for _, s in keys])
        wrong = asr.score([wavs[k] for k in keys], [SENTENCES[(s + 1) % n] for _, s in keys])
        asr_s = time.perf_counter() - start
        wer_right = np.array([r.unwrap().wer for r in right]).reshape(len(VOICES), n)
        wer_wrong = np.array([r.unwrap().wer for r in wrong]).reshape(len(VOICES), n)

        start = time.perf_counter()
        # Sentence 0 of each voice against sentence 1 of each voice: same voice, different words.
        pairs = [(a, b) for a in VOICES for b in VOICES]
        sims = spk.score([wavs[(a, 0)] for a, _ in pairs], [wavs[(b, 1)] for _, b in pairs])
        spk_s = time.perf_counter() - start
        similarity = np.array([r.unwrap().cosine for r in sims]).reshape(len(VOICES), len(VOICES))

        transcripts = [r.unwrap().transcript for r in right]
        looping = "the weather in paris will be sunny will be sunny will be sunny will be sunny"
        ruled = rules.score([*transcripts, looping], [*(SENTENCES[s] for _, s in keys), SENTENCES[3]])

    print(f"\nIntelligibility: {len(keys) * 2} utterances scored in {asr_s:.1f} s")
    print(f"{'voice':<16} {'WER right ref':>14} {'WER wrong ref':>14}")
    for i, voice in enumerate(VOICES):
        print(f"{voice:<16} {wer_right[i].mean():>14.3f} {wer_wrong[i].mean():>14.3f}")
    print(f"\nSpeaker similarity: {len(pairs)} pairs in {spk_s:.1f} s (rows: sentence 0, columns: sentence 1)")
    print(" " * 16 + "".join(f"{v:>16}" for v in VOICES))
    for i, voice in enumerate(VOICES):
        print(f"{voice:<16}" + "".join(f"{similarity[i, j]:>16.3f}" for j in range(len(VOICES))))
    print("\nRule rewards (R1 accuracy, R2 hallucination) of the first transcripts and a looping output:")
    for text, result in [*zip(transcripts[:3], ruled[:3], strict=True), (looping, ruled[-1])]:
        score = result.unwrap()
        print(f"  R1={score.accuracy_reward:.2f} R2={score.hallucination_reward:+.0f} "
              f"{','.join(score.hallucination_reasons) or '-':<16} {text[:60]!r}")
    plot(out / "demo.png", wer_right, wer_wrong, similarity)
    print(f"\nplot: {out / 'demo.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl score-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["score-demo"])
    parser.add_argument("--out", default="runs/score-demo", help="folder for generated speech and the plot")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = os.environ.get("SPEECHRL_HOME", ".speechrl")
    print("bringing the stack up (first start warms the models; about a minute on 2 cores)")
    only = ["--only", "rules,intelligibility,speaker,gateway"]
    stack.main(["up", "--home", home, *only])
    try:
        run(out)
    finally:
        if not args.keep_running:
            stack.main(["down", "--home", home, *only])
