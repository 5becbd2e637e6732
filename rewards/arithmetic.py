"""Rewards for tasks whose answer is one number: correctness against ground truth, and tag format.

Both follow TRL's signature ``fn(prompts, completions, **dataset_columns) -> list[float | None]``.
The model is asked to end with ``<answer>N</answer>``; extraction prefers the last such tag, then a
LaTeX ``\\boxed{N}``, then the last number in the text, so a correct answer without tags still counts
for correctness while answer_format rewards the tags themselves.

    rlx.rewards.load_reward("rewards/arithmetic.py:correctness")
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rlx.rewards import completion_text

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# A number as written in prose: "-3", "1,234", "3.50", "3/4". A minus counts only when it is not
# preceded by a digit, so "12-5" yields 12 and 5 rather than 12 and -5.
NUMBER = re.compile(r"(?:(?<![\d)])[-−])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_NUMBER_ALONE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def parse_number(s: str | None) -> float | None:
    """Parse one number written the way models and datasets write it, else return None.

    Accepts "-3", "1,234", "3.50", "12.", "$12", "= 12", "3/4", "\\boxed{12}" and "$\\frac{3}{4}$"
    -style wrappers around a single number. Anything with words left over ("12 apples") is None.
    """
    if s is None:
        return None
    text = s.strip().replace("−", "-").replace("\\$", "$")  # unicode minus; escaped LaTeX dollar
    boxes = _boxed_contents(text)
    if len(boxes) == 1 and text == f"\\boxed{{{boxes[0]}}}":
        text = boxes[0].strip()
    text = text.lstrip("=").strip().strip("$").strip()
    frac = re.fullmatch(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", text)
    if frac:
        text = f"{frac.group(1)}/{frac.group(2)}"
    text = text.removesuffix(".").replace(" ", "")
    if text.startswith("-$") or text.startswith("$-"):
        text = "-" + text[2:]
    numerator, slash, denominator = text.partition("/")
    if slash:
        top, bottom = _plain_number(numerator), _plain_number(denominator)
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom
    return _plain_number(text)


def extract_answer(text: str) -> str | None:
    """Return the final answer written in a completion, or None if it states none.

    Order of preference: the content of the last <answer>...</answer> tag (its number, if the tag
    holds words around one), then the last \\boxed{...}, then the last number anywhere in the text.
    """
    tags = ANSWER_TAG.findall(text)
    if tags:
        content = tags[-1].strip()
        if not content:
            return None
        if parse_number(content) is not None:
            return content
        # "<answer>12 apples</answer>": the number is still the answer.
        return _last_number(content) or content
    boxes = _boxed_contents(text)
    if boxes:
        return boxes[-1].strip() or None
    return _last_number(text)


def correctness(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None], **kwargs: Any
) -> list[float | None]:
    """1.0 when the extracted answer equals the ground truth `answer` column numerically, else 0.0.

    None for samples without a ground truth. A ground truth that is not a number (e.g. "B") is
    compared as a case-insensitive string, so the function also serves multiple-choice data.
    """
    rewards: list[float | None] = []
    for completion, truth in zip(completions, answer, strict=True):
        if truth is None or not str(truth).strip():
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if _same_answer(predicted, str(truth)) else 0.0)
    return rewards


def answer_format(
    prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 for exactly one <answer> tag holding a single number, 0.5 for tags otherwise, else 0.0."""
    rewards: list[float | None] = []
    for completion in completions:
        tags = ANSWER_TAG.findall(completion_text(completion))
        if not tags:
            rewards.append(0.0)
        elif len(tags) == 1 and parse_number(tags[0]) is not None:
            rewards.append(1.0)
        else:
            rewards.append(0.5)
    return rewards


def _same_answer(predicted: str | None, truth: str) -> bool:
    """Numeric equality when the truth is a number, else case-insensitive string equality."""
    if predicted is None:
        return False
    truth_value = parse_number(truth)
    if truth_value is None:
        return predicted.strip().casefold() == truth.strip().casefold()
    predicted_value = parse_number(predicted)
    if predicted_value is None:
        return False
    return math.isclose(predicted_value, truth_value, rel_tol=1e-9, abs_tol=1e-9)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} in text, with nested braces ("\\boxed{\\frac{3}{4}}") kept whole."""
    contents = []
    for match in re.finditer(r"\\boxed\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


def _plain_number(text: str) -> float | None:
    """Parse "-1,234.5"-style text with nothing else in it."""
    text = text.strip()
    if not _NUMBER_ALONE.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _last_number(text: str) -> str | None:
    """The last number written in free text, as written."""
    matches = NUMBER.findall(text)
    return matches[-1] if matches else None
