"""Faulty verify functions for ``RewardPool(verify=...)``: each behaves like math-verify except on an
answer containing its marker. Module-level, so the pool's forked workers receive them by reference."""
from __future__ import annotations

import os
import time

from real_megatron.rewards.math_reward import verify_answer

CRASH_MARKER, HANG_MARKER = "CRASH-HERE", "HANG-HERE"
CRASH_EXIT_CODE = 70


def crash_on_marker(answer: str, truths: list[str]) -> float:
    """Dies without a word on the marker, as a segfault in a C extension would."""
    if CRASH_MARKER in answer:
        os._exit(CRASH_EXIT_CODE)
    return verify_answer(answer, truths)


def hang_on_marker(answer: str, truths: list[str]) -> float:
    """Never returns on the marker, as a C call stuck in a huge computation."""
    if HANG_MARKER in answer:
        while True:
            time.sleep(3600)
    return verify_answer(answer, truths)
