"""Paired statistics of ``real-megatron compare``: which differences between losses the experiment resolves.

The measured quantity is the *average pass@1*: the mean over levels of each level's pass@1, and a level's
pass@1 is the mean over its held-out problems of the problem's pass rate c/n (c correct of n samples).
Within a seed every loss starts from the same weights and sees the same prompts and sampling seeds, so two
losses are compared *paired*: per seed s, per problem i of level l,

    d[s, l, i] = r_X[s, l, i] − r_Y[s, l, i]        (r = c / n, the problem's pass rate)
    D_s        = mean_l mean_i d[s, l, i]            (the seed's difference in average pass@1)
    D̄          = mean_s D_s                          (what the paired table reports, ``mean_diff``)

D̄ estimates the expected difference over training seeds, evaluation samples and problems of the task
(the held-out problems are a sample of it). Its variance has two parts, each estimated from the data:

* seeds:    Var(D_s) / S, with S the number of seeds, estimated by the sample variance of the D_s
            (S − 1 degrees of freedom). It holds the training runs' seed-to-seed spread *and* the
            evaluation's sampling noise (each D_s comes from its own evaluations) and every
            seed × problem interaction;
* problems: the part every seed shares: a problem on which X is systematically better than Y counts in
            every D_s alike, so the spread of the D_s cannot show it. Per level, a two-way layout
            (seeds × problems) of d gives the problems' mean square MS_p = S · var_i(mean_s d) and the
            residual mean square MS_r; the problem effects' variance is σ²_p = max(0, (MS_p − MS_r) / S)
            (method of moments), and the level adds σ²_p / (P_l · L²) to Var(D̄) (P_l problems, L levels).

The 95 % interval combines the parts' own intervals: D̄ ± √((t_{0.975, S−1} · SE_seeds)² + (z_{0.975} ·
SE_problems)²), Student's t for the seed part (estimated from S − 1 degrees of freedom: t = 4.30 for 3
seeds) and the normal for the problem part (hundreds of problems). It is ``resolved`` when it excludes 0.
Simulated (``tests/test_compare_stats.py``, 2,000 synthetic comparisons per regime) its coverage is
94.7–97.9 %: exact where the seeds dominate, a little conservative where the problems do. A
Welch–Satterthwaite t over the summed variance covered only 92–94 % in such mixes: with 2 degrees of freedom the
seed part is often underestimated, and its estimated df then grows exactly when the interval should not
shrink. With one seed there is no interval (the seed spread is unknown). A single reference evaluation
shared by every seed (the warm-up, ``vs="start"``) works the same: its own sampling noise is common to
all seeds and lands in the problem part.

Evaluation noise of one evaluation (``eval_standard_error``): given the problems, the average pass@1's
sampling variance is (1/L²) Σ_l Σ_i q_i(1 − q_i) / (n P_l²); estimated with r_i(1 − r_i)/(n − 1) per
problem (unbiased), and bounded by q(1 − q) ≤ 1/4: SE ≤ (1/L) √(Σ_l 1 / (4 n P_l)) — 0.5 points for
5 levels × 100 problems × 20 samples.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Rates = Sequence[Sequence[float]]  # per level, each problem's pass rate c / n (problems in file order)


# ----------------------------------------------------------------------------- Student's t
def _betainc_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz evaluation);
    converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betainc_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_fraction(b, a, 1 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` > 0 degrees of freedom (any real df; ``inf``: the normal):
    1 − I_{df/(df+x²)}(df/2, 1/2) / 2 for x >= 0, by symmetry below."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on ``t_cdf``)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10 * max(1.0, abs(lo)):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ----------------------------------------------------------------------------- one evaluation
def average_pass_at_1(rates: Rates) -> float:
    """Mean over levels of each level's mean pass rate."""
    return float(np.mean([np.mean(level) for level in rates]))


def eval_standard_error(correct: Sequence[Sequence[int]], samples: int) -> float:
    """Sampling standard error of one evaluation's average pass@1 (module docstring), from each problem's
    correct count: (1/L) √(Σ_l Σ_i r_i(1 − r_i) / ((n − 1) P_l²)). NaN with one sample per problem."""
    if samples < 2:
        return float("nan")
    total = 0.0
    for level in correct:
        r = np.asarray(level, dtype=float) / samples
        total += float(np.sum(r * (1 - r))) / (samples - 1) / len(r) ** 2
    return math.sqrt(total) / len(correct)


def eval_standard_error_bound(problems_per_level: Sequence[int], samples: int) -> float:
    """The largest sampling SE any pass rates can give: every q = 1/2, (1/L) √(Σ_l 1 / (4 n P_l))."""
    return math.sqrt(sum(1 / (4 * samples * p) for p in problems_per_level)) / len(problems_per_level)


def level_standard_error_bound(pass_rates: Sequence[float], problems_per_level: Sequence[int], samples: int) -> float:
    """SE bound of an average pass@1 known only per level (e.g. the trainer's eval rows): per level
    Σ_i q_i(1 − q_i) ≤ P p(1 − p) (concavity, p the level's mean), so SE ≤ (1/L) √(Σ_l p_l(1 − p_l) / (n P_l))."""
    total = sum(p * (1 - p) / (samples * n) for p, n in zip(pass_rates, problems_per_level, strict=True))
    return math.sqrt(total) / len(pass_rates)


# ----------------------------------------------------------------------------- paired differences
def _as_levels(rates: Rates, what: str) -> list[np.ndarray]:
    levels = [np.asarray(level, dtype=float) for level in rates]
    if not levels or any(level.ndim != 1 or level.size == 0 for level in levels):
        raise ValueError(f"{what}: expected per-level lists of per-problem pass rates, each non-empty")
    return levels


def paired_difference(x: Mapping[int, Rates], y: Mapping[int, Rates] | Rates, *, confidence: float = 0.95) -> dict:
    """Paired difference X − Y in average pass@1 over the seeds both have (module docstring).

    ``x``: seed -> per-level per-problem pass rates; ``y``: the same, or one evaluation shared by every seed
    (a sequence of levels). Returns fractions (not points): ``mean_diff``, ``ci_low``, ``ci_high`` (None
    with fewer than 2 seeds), ``resolved`` (the interval excludes 0), ``n_seeds``, ``per_seed`` (the D_s),
    ``se`` and its parts ``se_seeds`` / ``se_problems``.
    """
    shared = not isinstance(y, Mapping)
    seeds = sorted(x) if shared else sorted(set(x) & set(y))
    if not seeds:
        raise ValueError("paired_difference: no seed in common")
    diffs = []  # per seed: list over levels of per-problem differences
    for s in seeds:
        xs = _as_levels(x[s], f"seed {s} of X")
        ys = _as_levels(y if shared else y[s], "Y" if shared else f"seed {s} of Y")
        if [len(a) for a in xs] != [len(b) for b in ys]:
            raise ValueError(f"seed {s}: X and Y were evaluated on different problems "
                             f"({[len(a) for a in xs]} vs {[len(b) for b in ys]} per level)")
        diffs.append([a - b for a, b in zip(xs, ys, strict=True)])
    n_seeds, n_levels = len(seeds), len(diffs[0])
    per_seed = np.array([np.mean([np.mean(level) for level in d]) for d in diffs])
    mean = float(per_seed.mean())
    out = {"mean_diff": mean, "n_seeds": n_seeds,
           "per_seed": {int(s): float(v) for s, v in zip(seeds, per_seed, strict=True)},
           "ci_low": None, "ci_high": None, "resolved": False, "se": None, "se_seeds": None, "se_problems": None,
           }
    if n_seeds < 2:
        return out
    var_seeds = float(per_seed.var(ddof=1)) / n_seeds
    var_problems = 0.0
    for lv in range(n_levels):
        m = np.stack([d[lv] for d in diffs])  # [seeds, problems]
        n_problems = m.shape[1]
        if n_problems < 2:
            continue
        col, row, grand = m.mean(axis=0), m.mean(axis=1, keepdims=True), m.mean()
        ms_problems = n_seeds * float(np.sum((col - grand) ** 2)) / (n_problems - 1)
        ms_resid = float(np.sum((m - row - col + grand) ** 2)) / ((n_seeds - 1) * (n_problems - 1))
        sigma2 = max(0.0, (ms_problems - ms_resid) / n_seeds)
        v = sigma2 / (n_problems * n_levels ** 2)
        var_problems += v
    var = var_seeds + var_problems
    half = math.hypot(t_quantile(0.5 + confidence / 2, n_seeds - 1) * math.sqrt(var_seeds),
                      t_quantile(0.5 + confidence / 2, math.inf) * math.sqrt(var_problems))
    out.update(ci_low=mean - half, ci_high=mean + half, resolved=bool(mean - half > 0 or mean + half < 0),
               se=math.sqrt(var), se_seeds=math.sqrt(var_seeds), se_problems=math.sqrt(var_problems))
    return out
