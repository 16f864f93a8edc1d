"""Imported once by the reward pool's fork server so that every forked worker starts warm.

Importing math-verify (sympy, the LaTeX grammar) takes ~0.7 s and its first ``parse`` another
~0.25 s (the grammar's tables are built lazily). Doing both here, in the fork server, means a worker
that replaces a killed one is ready in milliseconds instead of a second of CPU on a 2-core box.
Nothing here may import torch: the fork server must stay a small single-threaded process.
"""
import signal

from real_megatron.rewards.math_reward import math_reward

# The fork server outlives no one (it exits when the trainer closes its end of the "alive" pipe), but a
# Ctrl-C / scancel of the job must not kill it mid-step: the trainer still scores its last rollout step
# (and replaces workers through it) before saving. multiprocessing already makes it ignore SIGINT.
signal.signal(signal.SIGTERM, signal.SIG_IGN)

# One verification exercises parse (boxed and inline paths) and verify; the result is irrelevant.
math_reward("\\boxed{\\frac{1}{2}}", "0.5")
