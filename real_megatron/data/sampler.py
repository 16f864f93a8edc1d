"""Deterministic prompt sampling with exact resume.

Each epoch is a fresh permutation of the prompt set drawn from ``(seed, epoch)`` alone, so the order
depends on nothing but the seed and the dataset size. A batch that runs past the end of an epoch is
completed from the next epoch's permutation: every batch has exactly ``batch_size`` prompts and no
prompt is dropped. ``state_dict()`` holds (epoch, position); loading it continues with the very
batch an uninterrupted run would have drawn next.
"""
from __future__ import annotations

from collections.abc import Sequence


class PromptSampler:
    """Draws batches of ``batch_size`` prompts, shuffled per epoch, reproducible from ``seed``."""

    def __init__(self, prompts: Sequence, batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if len(prompts) == 0:
            raise ValueError("PromptSampler: the prompt set is empty (check data.train_files and skipped rows)")
        if batch_size > len(prompts):
            raise ValueError(f"batch_size={batch_size} is larger than the prompt set ({len(prompts)} prompts); "
                             "lower the batch size or add data")
        self.prompts = prompts
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # next index into the current epoch's permutation
        self._order = self._permutation(0)

    def _permutation(self, epoch: int):
        # numpy imported here, not at module level: the reward pool's fork server imports this package and
        # must stay free of BLAS threads (see real_megatron.rewards.pool)
        import numpy as np

        # SeedSequence mixes (seed, epoch) into independent streams: no arithmetic seed collisions
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(len(self.prompts))

    def next_batch(self) -> list:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.prompts[int(i)] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_prompts": len(self.prompts), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_prompts"]) != len(self.prompts) or int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts with seed {state['seed']}, but this "
                             f"run has {len(self.prompts)} prompts with seed {self.seed}; resume with the same data "
                             "files, data.on_bad_row and seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self.prompts) or epoch < 0:
            raise ValueError(f"sampler state has epoch={epoch}, position={position}: out of range")
        # batch_size may change on resume; the stream of prompts continues from the same place
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
