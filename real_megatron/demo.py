"""`real-megatron demo`: the README's first command.

Until the training loop lands this draws the paper's Figure 1 from the loss library
(``real-megatron plot-weights``) into ``runs/``.
"""
from __future__ import annotations

from real_megatron.plots import main_plot_weights


def main(argv: list[str]) -> int:
    return main_plot_weights(argv or ["--out", "runs/figure1_gradient_weights.png"])
