"""Do the backward's sums over train rows give the same bits when zero rows are appended (a padded model)?

    python benchmarks/padding_sums.py [--threads 1] [--max-n 2000]
    python benchmarks/padding_sums.py --cost [--threads 1]     # what the blocked sums cost the transformer

A model with fewer train rows than its batch's most is padded with rows weighted 0 (fastgrok/data.py), so
its dz rows there are 0. It trains bit for bit as alone only if every sum over rows gives the same bits with
and without the zeros. For n real rows (multiples of 16, as the batch rounds) and zeros appended in whole
blocks of 16, this compares bitwise: one bmm h^T dz (K = rows), the blocked `models._row_product` the MLP
uses, and dz.sum(1) (b2's gradient). Prints the (n, zeros) pairs that differ for each.

--cost times the transformer's eager forward + backward (p = 59, d_model 128, M = 4, the study's 1,392
rows) with its sums over rows in blocks of `models.ROW_BLOCK` and in one block (one BLAS call, as autograd's
own backward), interleaved, and prints the ratio of the medians.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastgrok.core.models as models
import fastgrok.kernels.reference as reference
from fastgrok.core.models import _row_product


def cost(repeats: int = 15) -> None:
    """Median time of the transformer's forward + backward, blocked vs one block, interleaved."""
    from fastgrok.config import TrainConfig
    m = models.build_model(TrainConfig(model="transformer", p=59))
    g = torch.Generator().manual_seed(0)
    M, N = 4, 1392
    flat = torch.randn(M, m.layout.n_params, generator=g) * 0.05
    a, b = torch.randint(0, 59, (N,), generator=g), torch.randint(0, 59, (N,), generator=g)
    dz = torch.randn(M, N, 59, generator=g)

    def step() -> float:
        t = time.perf_counter()
        leaf = flat.clone().requires_grad_(True)
        torch.autograd.grad(m.logits(leaf, a, b), leaf, dz)
        return time.perf_counter() - t

    blocks, times = models.ROW_BLOCK, {"blocked": [], "one block": []}
    try:
        for i in range(2 * repeats + 2):
            name = "blocked" if i % 2 == 0 else "one block"
            models.ROW_BLOCK = reference.ROW_BLOCK = blocks if name == "blocked" else N   # products and sums
            dt = step()
            if i >= 2:                                              # the first of each: warm-up
                times[name].append(dt)
    finally:
        models.ROW_BLOCK = reference.ROW_BLOCK = blocks
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"transformer forward + backward, p = 59, d_model 128, M = {M}, {N} rows, {torch.get_num_threads()} "
          f"thread(s): blocked {med['blocked'] * 1e3:.0f} ms, one block {med['one block'] * 1e3:.0f} ms, "
          f"ratio {med['blocked'] / med['one block']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-n", type=int, default=2000)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--V", type=int, default=31)
    ap.add_argument("--cost", action="store_true", help="time the transformer's blocked backward instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        cost()
        return
    g = torch.Generator().manual_seed(0)
    bad = {"one bmm": [], "blocked (_row_product)": [], "sum over rows": []}
    checked = 0
    for n in range(16, args.max_n + 1, 16):
        h = torch.randn(2, n, args.H, generator=g)
        dz = torch.randn(2, n, args.V, generator=g) * 1e-3
        for pad in (16, 48, 64, 144, 256, 400):
            hp = torch.cat([h, h[:, :1].expand(-1, pad, -1)], 1)
            dzp = torch.cat([dz, torch.zeros(2, pad, args.V)], 1)
            checked += 1
            if not torch.equal(torch.bmm(h.transpose(1, 2), dz), torch.bmm(hp.transpose(1, 2), dzp)):
                bad["one bmm"].append((n, pad))
            if not torch.equal(_row_product(h, dz), _row_product(hp, dzp)):
                bad["blocked (_row_product)"].append((n, pad))
            if not torch.equal(dz.sum(1), dzp.sum(1)):
                bad["sum over rows"].append((n, pad))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {checked} (n, zeros) pairs, n <= {args.max_n}")
    for name, pairs in bad.items():
        print(f"  {name}: {len(pairs)} differ" + (f", first {pairs[:6]}" if pairs else ""))


if __name__ == "__main__":
    main()
