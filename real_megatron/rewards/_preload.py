"""Imported once by the reward pool's fork server so that every forked worker starts warm.

Importing math-verify (sympy, the LaTeX grammar) takes ~0.7 s and its first ``parse`` another
~0.25 s (the grammar's tables are built lazily). Doing both here, in the fork server, means a worker
that replaces a killed one is ready in milliseconds instead of a second of CPU on a 2-core box.
Nothing here may import torch: the fork server must stay a small single-threaded process.
"""
from real_megatron.rewards.math_reward import math_reward

# One verification exercises parse (boxed and inline paths) and verify; the result is irrelevant.
math_reward("\\boxed{\\frac{1}{2}}", "0.5")
