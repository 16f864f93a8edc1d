"""``real-megatron launch`` from a checkout: ``python examples/launch.py --recipe tiny_cpu --gpus 1 --dryrun``.

The launcher lives in the package (``real_megatron/launch.py``: flags, recipes, what runs where); this
file only makes it runnable without ``pip install -e .`` by putting the checkout first on ``sys.path``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_megatron.launch import main  # noqa: E402  (after the path set-up above)

if __name__ == "__main__":
    raise SystemExit(main())
