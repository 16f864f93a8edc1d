"""The paper at small scale, on the CPU: the synthetic tasks, the recipe, the demo, ``compare`` and the figures.

This package uses the stack (``real_megatron.trainer``, ``sft``, ``losses``, ``data`` …) like any user
would; nothing outside it imports it (a test checks).

* ``arithmetic.py`` — one-step sums (the smallest end-to-end task; tests and benchmarks), ``assets.py``
  builds its tokenizer and tiny random Qwen2;
* ``chains.py`` — the multi-step arithmetic-chain task (five held-out levels), ``make_task.py`` writes it;
* ``tokenizer.py`` — a byte-level BPE tokenizer trained on a task's own text;
* ``recipe.py`` — every setting of the demo and ``compare`` (model, warm-up, RL, evaluation);
* ``demo.py`` — ``real-megatron demo``; ``compare.py`` / ``summary.py`` / ``figures.py`` —
  ``real-megatron compare`` and its tables and figures (Tables 1 and 4, Figures 1, 4 and 5).
"""
