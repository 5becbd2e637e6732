"""A length reward: full score up to a target length, falling linearly to zero at 4x the target.

The knob is `target_tokens`: completions of at most that many tokens score 1.0, a completion of
``target_tokens * (1 + 3 * x)`` tokens scores ``1 - x``, and anything from 4x the target on scores
0.0. Lengths are token counts when the trainer passes ``completion_ids`` (TRL does), otherwise
whitespace-separated words, a rough stand-in that keeps the reward usable on plain text.

    rlx.rewards.load_reward("rewards/length.py:conciseness")   # target 128 tokens
    make_conciseness(64)                                       # same reward, 64-token target
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rlx.rewards import completion_text

DEFAULT_TARGET_TOKENS = 128
"""Enough for a short chain of thought and an <answer> tag on grade-school arithmetic."""

ZERO_AT_MULTIPLE = 4
"""The reward reaches 0.0 at this multiple of the target length."""


def length_score(length: int, target_tokens: int) -> float:
    """1.0 at or under target_tokens, linear down to 0.0 at ZERO_AT_MULTIPLE * target_tokens."""
    if length <= target_tokens:
        return 1.0
    excess = (length - target_tokens) / ((ZERO_AT_MULTIPLE - 1) * target_tokens)
    return max(0.0, 1.0 - excess)


def conciseness(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    **kwargs: Any,
) -> list[float | None]:
    """Score each completion by its length: see the module docstring for the shape and the knob."""
    _check_target(target_tokens)
    if completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(completion_text(completion).split()) for completion in completions]
    return [length_score(length, target_tokens) for length in lengths]


def make_conciseness(target_tokens: int) -> Callable[..., list[float | None]]:
    """Return conciseness with its target fixed, named e.g. "conciseness_64" for logs."""
    _check_target(target_tokens)

    def reward(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        return conciseness(
            prompts, completions, completion_ids, target_tokens=target_tokens, **kwargs
        )

    reward.__name__ = reward.__qualname__ = f"conciseness_{target_tokens}"
    reward.__doc__ = f"conciseness with target_tokens={target_tokens}: 1.0 up to it, 0.0 from 4x."
    return reward


def _check_target(target_tokens: int) -> None:
    """Reject targets that would divide by zero or silently invert the reward."""
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
