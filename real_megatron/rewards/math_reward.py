"""Math answer verification with math-verify: the last ``\\boxed{}`` answer against the ground truth.

``math_reward`` runs in the calling process and has no hard deadline of its own: math-verify's
timeouts use SIGALRM, which cannot interrupt a long C-level call (a power tower such as
``9^{9^{9^9}}`` runs for seconds) and only works on the main thread. The trainer therefore calls it
through ``RewardPool`` (``real_megatron.rewards.pool``), whose worker processes are killed at a hard
deadline. Call ``math_reward`` directly only on trusted input (tests, analysis).

Split in two on purpose: ``extract_answer`` (the last box, optionally after ``</think>``; linear,
capped, safe to run in the trainer) and ``verify_answer`` (math-verify parse + verify; unbounded,
run by the pool's workers).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from real_megatron.data.prompts import ground_truth_candidates

# A boxed answer longer than this is not a final answer but runaway text; score it 0.0 without
# handing it to the LaTeX parser (whose cost grows quickly with nesting depth). The longest ground
# truth in the shipped benchmarks is ~200 characters.
MAX_ANSWER_CHARS = 1000

# Same idea for nesting: math-verify's LaTeX parser slows down sharply with depth (400 nested braces
# run past a 1.5 s deadline), while the deepest ground truth in the shipped data (DAPO-Math-17k included) nests 3 levels.
MAX_BRACE_DEPTH = 32

THINK_END = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")

# math-verify logs a warning for every disabled timeout and every parse failure; both are expected here
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _to_text(value) -> str:
    """Any response as a str that encodes cleanly: bytes are decoded leniently, lone surrogates replaced."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from os.fsdecode or a broken detokenizer)
        value = value.encode("utf-8", errors="replace").decode("utf-8")
    return value


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    The last box command decides: when its braces never close (a truncated response) or nest deeper
    than MAX_BRACE_DEPTH the result is None rather than an earlier box. Escaped braces ``\\{`` ``\\}`` do not count for nesting.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i].isalpha():  # e.g. \boxedx is another macro, not a box
        return None
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # "\boxed 5": the argument runs to the next whitespace or math delimiter
        j, end = i, min(len(text), i + MAX_ANSWER_CHARS + 1)
        while j < end and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i:j] or None
    # The scan stops after MAX_ANSWER_CHARS: it is pure Python, and the pool runs it in the trainer's
    # process, so its cost must not grow with the response (a megabyte of "{" after a \boxed).
    depth, j, end = 0, i, min(len(text), i + MAX_ANSWER_CHARS + 2)
    while j < end:
        ch = text[j]
        if ch == "\\":
            j += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH + 1:  # +1: the box's own brace
                return None
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def extract_answer(response, *, answer_after_think: bool = False) -> str | None:
    """The answer a response gives: its last boxed content (only after the last ``</think>`` if asked)."""
    text = _to_text(response)
    if answer_after_think:
        cut = text.rfind(THINK_END)
        if cut < 0:
            return None  # never finished thinking: no final answer
        text = text[cut + len(THINK_END):]
    answer = last_boxed_answer(text)
    if answer is None:
        return None
    answer = answer.strip()
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


@functools.lru_cache(maxsize=65536)
def parse_ground_truth(ground_truth: str) -> tuple:
    """math-verify parse of a (normalised) ground truth; ``()`` when math-verify cannot read it.

    Tried in order: as a boxed answer (the same path the response takes), then as inline math.
    """
    from math_verify import parse

    for text in (f"\\boxed{{{ground_truth}}}", f"${ground_truth}$"):
        parsed = parse(text, parsing_timeout=None)
        if parsed:
            return tuple(parsed)
    return ()


@functools.lru_cache(maxsize=16384)
def _parse_answer_cached(answer: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=None))


def parse_answer(answer: str) -> list:
    """math-verify parse of an extracted answer. Cached: a policy repeats the same final answers many
    times per batch (and parsed sympy objects are immutable), so each distinct string is parsed once."""
    return list(_parse_answer_cached(answer))


def math_reward(response, ground_truth: str | Sequence[str], *, answer_after_think: bool = False) -> float:
    """1.0 when the response's last ``\\boxed{}`` answer equals the ground truth per math-verify, else 0.0.

    ``ground_truth`` may be a raw value of any distributed type (normalised here) or a list of
    acceptable answers (any match scores 1.0). With ``answer_after_think`` only text after the last
    ``</think>`` counts, and a response without one scores 0.0. No hard deadline: see module docs.
    """
    answer = extract_answer(response, answer_after_think=answer_after_think)
    if answer is None:
        return 0.0
    return verify_answer(answer, ground_truth)


def verify_answer(answer: str, ground_truth) -> float:
    """1.0 when an extracted answer (the content of a box) equals any accepted ground truth, else 0.0.

    This is the part that can run for unbounded time (sympy); ``RewardPool`` extracts answers in the
    trainer (cheap, bounded) and runs only this in its killable workers.
    """
    from math_verify import verify

    golds = [parse_ground_truth(g) for g in ground_truth_candidates(ground_truth)]
    golds = [g for g in golds if g]
    if not golds:
        return 0.0
    pred = parse_answer(answer)
    if not pred:
        return 0.0
    for gold in golds:
        if verify(list(gold), pred, timeout_seconds=None):
            return 1.0
    return 0.0
