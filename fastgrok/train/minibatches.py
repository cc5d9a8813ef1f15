"""Each model's minibatches (`batch_size`, per model): which of its train rows each step trains on.

A model with batch size B and n train rows trains, at its step s (0-based), on rows
perm_e[k B : (k + 1) B] of its epoch e = s // E, k = s % E, E = ceil(n / B) steps per epoch (the last
batch of an epoch holds the rest, n - (E - 1) B rows: drop_last=False), where perm_e is epoch e's
permutation of its rows drawn from its own generator, exactly as torch's DataLoader(rows, batch_size=B,
shuffle=True, generator=g) draws them: per epoch one int64 (the loader's base seed), the permutation, and
the sampler's trailing (empty) slice of a second permutation. The generator is seeded with
`shuffle_seed(seed)`, derived from the model's seed alone, so a model's minibatches do not depend on the
batch of models it trains in. A model without a batch size (None: the study's full batch) trains on all its
rows at every step. The step reads the rows as (M, B_max) indices into each model's train rows and a bool
weight (False on padding), B_max a multiple of data.PAD_ROWS (padding changes no bit of a model's gradient).
"""
from __future__ import annotations

import numpy as np
import torch

from fastgrok.core.data import PAD_ROWS


def shuffle_seed(seed: int) -> int:
    """The seed of a model's minibatch generator: a 63-bit number from numpy's SeedSequence((seed, 1)),
    a stream apart from the model's initial draw (its seed) and its split (1000 + seed)."""
    return int(np.random.SeedSequence((seed, 1)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Minibatches:
    """The minibatch rows of a batch's models, step by step; host-side, one generator per model.
    n_rows: each model's train rows; sizes: each model's batch size (None: all its rows every step)."""

    def __init__(self, n_rows: list[int], sizes: list, seeds: list[int]):
        self.n, self.sizes, self.seeds = list(n_rows), list(sizes), list(seeds)
        self.width = -(-max(n if b is None else min(b, n) for n, b in zip(self.n, self.sizes)) // PAD_ROWS) * PAD_ROWS
        self._gen = [None] * len(self.n)
        self._epoch = [-1] * len(self.n)
        self._perm = [None] * len(self.n)

    def steps_per_epoch(self, i: int) -> int:
        b = self.sizes[i]
        return 1 if b is None else -(-self.n[i] // b)

    def _permutation(self, i: int, epoch: int) -> np.ndarray:
        """Model i's permutation of epoch `epoch` (drawn in order from its generator; from the start again
        when asked for an earlier one, as after a resume)."""
        if epoch < self._epoch[i] or self._gen[i] is None:
            self._gen[i], self._epoch[i] = torch.Generator().manual_seed(shuffle_seed(self.seeds[i])), -1
        g, n = self._gen[i], self.n[i]
        while self._epoch[i] < epoch:
            torch.empty((), dtype=torch.int64).random_(generator=g)     # the DataLoader's base seed
            self._perm[i] = torch.randperm(n, generator=g).numpy()
            torch.randperm(n, generator=g)                              # the sampler's trailing slice
            self._epoch[i] += 1
        return self._perm[i]

    def rows(self, i: int, step: int) -> np.ndarray:
        """Model i's train rows (indices into its own rows) at its step `step` (0-based)."""
        b = self.sizes[i]
        if b is None:
            return np.arange(self.n[i])
        E = self.steps_per_epoch(i)
        k = step % E
        return self._permutation(i, step // E)[k * b:(k + 1) * b]

    def fill(self, idx: torch.Tensor, weight: torch.Tensor, step: int, models) -> None:
        """Write step `step`'s rows of the given models (table rows, in batch order) into idx (M, width)
        int64 and weight (M, width) bool, in place (padding: row 0, weight False)."""
        ix = np.zeros((len(models), self.width), dtype=np.int64)
        w = np.zeros((len(models), self.width), dtype=bool)
        for r, i in enumerate(models):
            rows = self.rows(int(i), step)
            ix[r, :len(rows)], w[r, :len(rows)] = rows, True
        idx.copy_(torch.from_numpy(ix), non_blocking=True)
        weight.copy_(torch.from_numpy(w), non_blocking=True)
