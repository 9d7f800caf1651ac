"""Speech tokens to audio for scoring: the token2wav step, a pluggable callable (the user's own
vocoder, or SpeechRL's token2wav service), and what a trainer gets when it has none."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from speechrl.adapters.inputs import as_audio
from speechrl.client import AsyncToken2WavClient, AudioLike, ItemFailedError

Token2WavOutput = AudioLike | Exception | None
Token2Wav = Callable[[list[list[int]]], Sequence[Token2WavOutput] | Awaitable[Sequence[Token2WavOutput]]]
"""Turns speech-token sequences into audio, one per sequence, sync or async; where it could not, None
or the exception that says why (e.g. the token2wav service's per-item error)."""


class Token2WavNotConfigured(RuntimeError):
    """Speech tokens must become audio before they can be scored, and no token2wav step was given."""

    def __init__(self, where: str):
        super().__init__(
            f"token2wav backend not configured: {where} got speech tokens (<|s_N|>) but has no token2wav callable "
            "to turn them into audio. Pass token2wav=<callable taking list[list[int]] and returning one audio "
            "(path, WAV bytes or (samples, rate)) per sequence>, e.g. your CosyVoice flow + HiFT decoder, or "
            "SpeechRL's token2wav service (`speechrl serve token2wav`; the gateway's `token2wav` setting).")


def is_async_callable(fn: Any) -> bool:
    """Whether calling fn gives a coroutine: async functions, partials of them, objects with async __call__."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def load_callable(spec: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """A callable given itself or as "package.module:function" (what a YAML config can hold)."""
    if spec is None or callable(spec):
        return spec
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"give a callable as 'package.module:function', got {spec!r}")
    target = getattr(importlib.import_module(module), name)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


def token2wav_service(client: AsyncToken2WavClient,
                      prompt_audio: Callable[[int], Sequence[AudioLike]] | None = None) -> Token2Wav:
    """A token2wav hook backed by the token2wav service: one Synthesize call per batch, each item with
    a prompt speaker from prompt_audio(count) when given (CosyVoice2 needs one; espeak ignores it).

    An item the service could not render comes back as the exception that says why, so the reply's
    per-item error names the service's reason (e.g. ids out of range), not just "no audio".
    """

    async def render(token_lists: list[list[int]]) -> list[Token2WavOutput]:
        prompts = None if prompt_audio is None else list(prompt_audio(len(token_lists)))
        results = await client.synthesize(token_lists, prompt_audio=prompts)
        return [r.wav if r.error is None else ItemFailedError(f"{r.error.code}: {r.error.message}") for r in results]

    return render


async def speech_from_tokens(token2wav: Token2Wav | None, token_lists: Sequence[Sequence[int]],
                             where: str, *, reraise: tuple[type[Exception], ...] = ()
                             ) -> tuple[list[AudioLike | None], dict[int, str]]:
    """Audio for each token sequence (None where empty or failed) and the reasons per failed item.

    A sync token2wav runs in a worker thread so that it does not stall the event loop. A failing
    token2wav costs its items, unless its exception is one of `reraise` (a caller whose failure
    policy answers an outage with an error, not with failure rewards).
    Raises Token2WavNotConfigured when there are tokens and no token2wav.
    """
    errors = {i: "no speech tokens (<|s_N|>) in the completion" for i, t in enumerate(token_lists) if not t}
    todo = [i for i in range(len(token_lists)) if i not in errors]
    audios: list[AudioLike | None] = [None] * len(token_lists)
    if not todo:
        return audios, errors
    if token2wav is None:
        raise Token2WavNotConfigured(where)
    batch = [list(token_lists[i]) for i in todo]
    try:
        if is_async_callable(token2wav):
            produced = await token2wav(batch)  # type: ignore[misc]
        else:
            produced = await asyncio.to_thread(token2wav, batch)
            if inspect.isawaitable(produced):
                produced = await produced
    except Exception as exc:  # a failing vocoder costs its items, never the step (unless reraise)
        if isinstance(exc, reraise):
            raise
        for i in todo:
            errors[i] = f"token2wav failed: {type(exc).__name__}: {exc}"
        return audios, errors
    produced = list(produced)  # type: ignore[arg-type]
    if len(produced) != len(todo):
        for i in todo:
            errors[i] = f"token2wav returned {len(produced)} audios for {len(todo)} token sequences"
        return audios, errors
    for i, audio in zip(todo, produced, strict=True):
        if isinstance(audio, Exception):
            errors[i] = f"token2wav failed: {audio}"
            continue
        audios[i] = as_audio(audio)
        if audio is None:
            errors[i] = "token2wav produced no audio"
    return audios, errors

