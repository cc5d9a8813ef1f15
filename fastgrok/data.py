"""The modular-arithmetic task and each model's own train/test split.

All pairs (a, b) of `a op b mod p` (for div, b = 0 is left out), kept on the device. Model m's split is
the study's: a permutation from a generator seeded `1000 + seed_m`, its first n_train entries are the
train rows. Splits depend only on the model's seed, never on the batch it trains in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Task:
    a: torch.Tensor          # (N,) int64, first operand of every pair
    b: torch.Tensor          # (N,) int64
    y: torch.Tensor          # (N,) int64, the answer
    train_idx: torch.Tensor  # (M, n_train) int64, each model's train rows
    train_mask: torch.Tensor  # (M, N) bool

    @property
    def n_pairs(self) -> int:
        return self.a.shape[0]


def all_pairs(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    if op == "add":
        y = (a + b) % p
    elif op == "sub":
        y = (a - b) % p
    elif op == "mul":
        y = (a * b) % p
    elif op == "div":  # a * b^(p-2) mod p (Fermat inverse, p prime)
        inv = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        y = (a * inv[b]) % p
    else:
        raise ValueError(f"unknown op {op!r}")
    return a, b, y


def split_indices(n_pairs: int, n_train: int, seeds: list[int]) -> torch.Tensor:
    """(M, n_train) train rows, one permutation per seed from a generator seeded 1000 + seed."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + int(s))
        rows.append(torch.randperm(n_pairs, generator=g)[:n_train])
    return torch.stack(rows)


def make_task(p: int, op: str, n_train: int, seeds: list[int], device: torch.device | str = "cpu") -> Task:
    a, b, y = all_pairs(p, op)
    idx = split_indices(a.shape[0], n_train, seeds)
    mask = torch.zeros(len(seeds), a.shape[0], dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return Task(a=a.to(device), b=b.to(device), y=y.to(device), train_idx=idx.to(device),
                train_mask=mask.to(device))
