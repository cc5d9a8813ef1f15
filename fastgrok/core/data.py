"""The modular-arithmetic task and each model's own train/test split.

A model's task is a binary operation on p symbols (`a op b mod p`, a polynomial, composition in S_n or a
random table; config.OPS) over its pairs (for div, b = 0 is left out), its split the study's: a
permutation of ITS pairs from a generator seeded `SPLIT_SEED_OFFSET + seed_m` (1000 + seed_m), the first n_train entries its train
rows. Splits depend only on the model's seed, op and train fraction, never on the batch it trains in.

A batch whose models share one op keeps that op's pair list (N = p * p, or p * (p - 1) for div). Mixed
ops use all p * p pairs; a div model's b = 0 rows then belong to neither of its splits (`valid`), and
its rows are its own pair list mapped into the batch's, in the same order. Labels are (N,) when the
ops agree, else (M, N) (0 on invalid rows, which no mask selects).

Label noise (`label_noise`, a fraction f per model): after drawing its split, the model's split
generator draws which k = int(f * n_train) of its train rows are noisy (a permutation of its train rows,
the first k) and, for each, a label uniform over the p classes (so about k/p keep their answer by chance);
test rows keep their answers. Labels are then (M, N) and `noisy` (M, N) marks those rows. f = 0 draws
nothing: the task is bit for bit the one without noise.

Train rows are (M, n_max), n_max the batch's most train rows rounded up to a multiple of PAD_ROWS: a
model with fewer is padded at the end with its first train row, weighted 0 (`train_weight`, None when
no model is padded), so its loss is the mean over its own rows. The rounding makes a padded model
train bit for bit as it does alone: the sums over rows in the backward (b2's gradient; W2's product,
taken in blocks of 256 rows, models._row_product) give the same bits when zeros are appended in whole
blocks of 16, not after a partial block (`python benchmarks/padding_sums.py`: 0 of 750 (n, zeros) pairs
differ for n up to 2,000, 1 and 2 threads, where one bmm over all rows differs in 627 on an AVX-512 CPU). A model whose count is already a multiple of 16,
as the study's p = 59 split (1,392 rows), is padded only in a batch with larger counts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fastgrok.config import SPLIT_SEED_OFFSET, n_train_of, symmetric_group_degree

PAD_ROWS = 16
"""Padded train rows come in whole blocks of this many (see the module docstring)."""


@dataclass
class Task:
    a: torch.Tensor          # (N,) int64, first operand of every pair
    b: torch.Tensor          # (N,) int64
    y: torch.Tensor          # (N,) int64 the answer, or (M, N) when the models' ops differ
    train_idx: torch.Tensor  # (M, n_max) int64, each model's train rows (padded, see train_weight)
    train_mask: torch.Tensor  # (M, N) bool, each model's train rows
    test_mask: torch.Tensor   # (M, N) bool, each model's test rows (valid and not train)
    train_weight: torch.Tensor | None = None  # (M, n_max) bool: False on padding; None = no padding
    valid: torch.Tensor | None = None         # (M, N) bool: pairs of the model's task; None = all
    noisy: torch.Tensor | None = None         # (M, N) bool: train rows given a random label; None = no noise

    @property
    def n_pairs(self) -> int:
        return self.a.shape[0]


def op_table(p: int, op: str) -> torch.Tensor:
    """(p, p) int64: the answer of a op b, -1 where undefined (div: b = 0). See config.OPS."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    if op == "div":                                  # a * b^(p-2) mod p, the Fermat inverse (p prime)
        inv = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        return torch.where(b == 0, -1, (a * inv[b]) % p)
    if op == "quad":
        return (a * a + a * b + b * b) % p
    if op == "cubic":
        return (a * a * a + a * b) % p
    if op == "perm":                                 # symbols = the permutations of n items, in lexicographic order
        n = symmetric_group_degree(p)
        if n is None:
            raise ValueError(f"op 'perm' needs p = n!, got {p}")
        perms = list(itertools.permutations(range(n)))
        index = {q: i for i, q in enumerate(perms)}
        return torch.tensor([[index[tuple(x[y[k]] for k in range(n))] for y in perms] for x in perms])  # (x o y)(k) = x[y[k]]
    if op == "random":                               # one table per p, the same for every model and seed
        return torch.randint(0, p, (p, p), generator=torch.Generator().manual_seed(p))
    raise ValueError(f"unknown op {op!r}")


def all_pairs(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs (a, b) the op defines, row-major, and their answers (div: b = 0 left out)."""
    table = op_table(p, op)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    keep = table.reshape(-1) >= 0
    return a.reshape(-1)[keep], b.reshape(-1)[keep], table.reshape(-1)[keep]


def split_indices(n_pairs: int, n_train: int, seeds: list[int]) -> torch.Tensor:
    """(M, n_train) train rows, one permutation per seed from a generator seeded SPLIT_SEED_OFFSET + seed."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(SPLIT_SEED_OFFSET + int(s))
        rows.append(torch.randperm(n_pairs, generator=g)[:n_train])
    return torch.stack(rows)


def make_task(p: int, ops: str | list[str], train_fracs: float | list[float], seeds: list[int],
              device: torch.device | str = "cpu", label_noise: float | list[float] = 0.0,
              split_offset: int = SPLIT_SEED_OFFSET) -> Task:
    """The batch's task for models with these seeds, ops, train fractions and label-noise fractions (one
    value: all models). split_offset: each split generator is seeded split_offset + seed (the study's 1000;
    0 for `init = "prieto"`: Prieto et al.'s random_split under torch.manual_seed(seed), the same permutation)."""
    M = len(seeds)
    ops = [ops] * M if isinstance(ops, str) else list(ops)
    fracs = [train_fracs] * M if isinstance(train_fracs, (int, float)) else list(train_fracs)
    noise = [label_noise] * M if isinstance(label_noise, (int, float)) else list(label_noise)
    for f in noise:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {f!r}")
    # the batch's pair list, (a, b) row-major: the one op's pairs, or (ops differ) all p * p
    universe = ops[0] if len(set(ops)) == 1 else "add"
    a, b, _ = all_pairs(p, universe)
    N = a.shape[0]
    ys, valid, idx, noisy = [], [], [], []
    for seed, op, f, fn in zip(seeds, ops, fracs, noise):
        oa, ob, oy = all_pairs(p, op)                                # the model's own pairs
        rows = torch.arange(N) if op == universe else oa * p + ob   # its pairs' rows in the batch's list
        g = torch.Generator().manual_seed(split_offset + int(seed))
        perm = torch.randperm(oa.shape[0], generator=g)[: n_train_of(p, op, f)]
        idx.append(rows[perm])
        y = torch.zeros(N, dtype=torch.int64)
        y[rows] = oy
        v = torch.zeros(N, dtype=torch.bool)
        v[rows] = True
        hit = torch.zeros(N, dtype=torch.bool)
        k = int(fn * len(perm))
        if k:                                                        # its generator, after the split
            pick = idx[-1][torch.randperm(len(perm), generator=g)[:k]]
            y[pick] = torch.randint(0, p, (k,), generator=g)
            hit[pick] = True
        noisy.append(hit)
        ys.append(y)
        valid.append(v)
    n_max = -(-max(len(i) for i in idx) // PAD_ROWS) * PAD_ROWS
    if all(len(i) == len(idx[0]) for i in idx) and len(idx[0]) % PAD_ROWS == 0:
        n_max = len(idx[0])                                          # nothing to pad
    weight = torch.stack([torch.arange(n_max) < len(i) for i in idx])            # (M, n_max)
    train_idx = torch.stack([torch.cat([i, i[:1].expand(n_max - len(i))]) for i in idx])
    train_mask = torch.zeros(M, N, dtype=torch.bool)
    for m, i in enumerate(idx):
        train_mask[m, i] = True
    valid = torch.stack(valid)                                       # (M, N)
    shared = len(set(ops)) == 1 and not any(noise)                   # one label vector for all models
    y = ys[0] if shared else torch.stack(ys)
    dev = lambda t: None if t is None else t.to(device)             # noqa: E731
    return Task(a=dev(a), b=dev(b), y=dev(y), train_idx=dev(train_idx), train_mask=dev(train_mask),
                test_mask=dev(valid & ~train_mask), train_weight=None if bool(weight.all()) else dev(weight),
                valid=None if bool(valid.all()) else dev(valid),
                noisy=dev(torch.stack(noisy)) if any(noise) else None)
