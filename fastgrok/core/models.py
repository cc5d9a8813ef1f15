"""Models with a leading model axis M, their parameters living in one flat (M, P) buffer.

Layout of the flat buffer: all matrices first (they take weight decay and the clamp), then vectors
(biases, LayerNorm gains). `ParamLayout.views(flat)` gives named (M, ...) views; `bounds` are the
matrix segments' offsets (the clamp's per-layer segments), `n_mat` where the matrices end.

Initialisation: each matrix N(0, 1)/sqrt(its `fans` entry) times the model's init scale alpha (1 by
default; Omnigrok's `initialization_scale`), biases 0 (LayerNorm gains 1), drawn in float32 on the CPU (a float64 run starts from the same weights as a float32 one). The MLP's fans are the
study's code's: E (p x d) / sqrt(d), the embedding WIDTH, W1 / sqrt(2d), W2 / sqrt(H). Two draws:
- per model (`init = "model"`, the default): matrices in layout order from a generator seeded by the
  model's own seed, so its weights depend on its seed alone, never on its batch, cell or grid;
- the study's (`init = "study"`): one generator seeded with the cell's first seed draws each matrix for
  all S seeds of the cell at once, `randn(S, *shape)` in layout order, each divided by its scale; the
  model with seed seed0 + s takes slice s. Its weights depend on its cell (seed0, S), never on the batch.

The study's MLP has a hand-written backward (exact algebra, one screen): it keeps the training step a
plain tensor program that torch.compile traces whole. The peers' MLP (other inputs, depths, activations,
biases: `PeerMLP`) and the transformer use autograd.

A third draw, `init = "prieto"` (the one-hot PeerMLP only): Prieto et al.'s code's, per model from its seed:
their split's randperm, then each layer as torch's nn.Linear initialises it, U(+-1/sqrt(fan_in)), weight then
bias (`ParamLayout._linear_draw`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgrok.config import TrainConfig
from fastgrok.kernels.reference import ROW_BLOCK, operator_under_compile, row_sum


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_matrices: int            # the first n_matrices entries are matrices
    fans: tuple[int, ...]      # matrix i starts as N(0, 1) / sqrt(fans[i])
    uniform: tuple = ()
    """Optional, per entry (matrices, then vectors): None (a matrix: N(0, 1) / sqrt(its fan); a vector:
    ones or zeros) or a bound c > 0, U(-c, c) (torch's nn.Linear and Xavier draws). Entries drawn at
    random come from the generator in layout order, the matrices' first. Empty: every entry None."""

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for n in self.sizes:
            out.append(out[-1] + n)
        return out

    @property
    def n_params(self) -> int:
        return self.offsets[-1]

    @property
    def n_mat(self) -> int:
        return self.offsets[self.n_matrices]

    @property
    def bounds(self) -> list[int]:
        """Offsets of the matrix segments (S + 1 entries, S = number of matrices)."""
        return self.offsets[: self.n_matrices + 1]

    def spans(self, names) -> list[tuple[int, int, int]]:
        """(lo, rows, cols) of the named matrices: flat[:, lo:lo + rows * cols] viewed as (rows, cols)."""
        return [(self.offsets[self.names.index(n)], *self.shapes[self.names.index(n)]) for n in names]

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        M = flat.shape[0]
        off = self.offsets
        return {n: flat[:, off[i]:off[i + 1]].view(M, *s) for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        M = next(iter(tensors.values())).shape[0]
        return torch.cat([tensors[n].reshape(M, -1) for n in self.names], 1)

    def init(self, seeds: list[int], dtype: torch.dtype, device, *,
             cells: list[tuple[int, int]] | None = None, scales: list[float] | None = None,
             linear_after: list[int] | None = None) -> torch.Tensor:
        """(M, P) initial parameters of the models with these seeds. `cells`: None draws each model from
        its own seed (`init = "model"`); else, per model, its cell's (first seed, number of seeds), and
        the study's cell-level draw is used (`init = "study"`, see the module docstring). `linear_after`:
        per model, the pairs its split permuted (`init = "prieto"`, `_linear_draw`). `scales`: per model, a
        factor on every matrix (the init scale alpha; None = 1)."""
        if linear_after is not None:
            rows = [self._linear_draw(int(s), n) for s, n in zip(seeds, linear_after)]
            tensors = {k: torch.stack([r[k] for r in rows]) for k in self.names}
            mats = [tensors[k] for k in self.names[: self.n_matrices]]
            vecs = [tensors[k] for k in self.names[self.n_matrices:]]
            return self._flat(mats, vecs, len(seeds), scales, dtype, device)
        if cells is None:
            rows = [self._matrices(torch.Generator().manual_seed(int(s)), ()) for s in seeds]
            mats = [torch.stack([r[i] for r in rows]) for i in range(len(rows[0]))]         # (M, *shape)
        else:
            draws = {}
            for c0, S in set(cells):
                draws[(c0, S)] = self._matrices(torch.Generator().manual_seed(int(c0)), (S,))  # (S, *shape)
            for s, (c0, S) in zip(seeds, cells):
                if not 0 <= s - c0 < S:
                    raise ValueError(f"seed {s} is not one of its cell's seeds {c0}..{c0 + S - 1}")
            mats = [torch.stack([draws[c][i][s - c[0]] for s, c in zip(seeds, cells)])
                    for i in range(len(next(iter(draws.values()))))]
        M = len(seeds)
        drawn_vecs, mats = mats[self.n_matrices:], mats[: self.n_matrices]
        vecs = [drawn_vecs.pop(0) if self._bound(self.n_matrices + i) else _vector_init(n, shape).expand(M, *shape)
                for i, (n, shape) in enumerate(zip(self.names[self.n_matrices:], self.shapes[self.n_matrices:]))]
        return self._flat(mats, vecs, M, scales, dtype, device)

    def _flat(self, mats, vecs, M, scales, dtype, device) -> torch.Tensor:
        """(M, P): the matrices times each model's alpha (float64, rounded once), then the vectors."""
        if scales is not None and any(a != 1.0 for a in scales):
            alpha = torch.tensor(scales, dtype=torch.float64)
            mats = [(w.double() * alpha.view(-1, *([1] * (w.dim() - 1)))).float() for w in mats]
        flat = torch.cat([t.reshape(M, -1) for t in mats + vecs], 1)
        return flat.to(device=device, dtype=dtype)

    def _linear_draw(self, seed: int, n_pairs: int) -> dict[str, torch.Tensor]:
        """Prieto et al.'s code's draw: `torch.manual_seed(seed)`, their split (random_split: a randperm of
        the n_pairs pairs, data.make_task), then each layer W{i} (in, out) as torch's nn.Linear(in, out)
        initialises it, weight (out, in) then bias, from the same generator."""
        g = torch.Generator().manual_seed(seed)
        torch.randperm(n_pairs, generator=g)                # the split draws first (data.make_task keeps it)
        out = {}
        for name, (n_in, n_out) in zip(self.names[: self.n_matrices], self.shapes[: self.n_matrices]):
            w = torch.empty(n_out, n_in)
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)    # nn.Linear.reset_parameters
            out[name] = w.t()
            bias = "b" + name[1:]
            if bias in self.names:
                out[bias] = torch.nn.init.uniform_(torch.empty(n_out), -1 / math.sqrt(n_in), 1 / math.sqrt(n_in),
                                                   generator=g)
        return out

    def _bound(self, i: int):
        return self.uniform[i] if self.uniform else None

    def _matrices(self, g: torch.Generator, lead: tuple[int, ...]) -> list[torch.Tensor]:
        """Each matrix drawn from g in layout order, shape lead + its shape, divided by sqrt(its fan) (or
        U(-c, c) where `uniform` gives c), then the vectors `uniform` gives a bound."""
        out = [torch.randn(lead + shape, generator=g) / math.sqrt(fan) if self._bound(i) is None
               else (torch.rand(lead + shape, generator=g) * 2 - 1) * self._bound(i)
               for i, (shape, fan) in enumerate(zip(self.shapes[: self.n_matrices], self.fans))]
        return out + [(torch.rand(lead + self.shapes[i], generator=g) * 2 - 1) * self._bound(i)
                      for i in range(self.n_matrices, len(self.names)) if self._bound(i)]


def _vector_init(name: str, shape) -> torch.Tensor:
    return torch.ones(shape) if name.endswith("_g") else torch.zeros(shape)


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the exact (erf) GeLU: Phi(x) + x * phi(x)."""
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table (M, R, H), idx (N,) shared or (M, N) per model -> (M, N, H)."""
    if idx.dim() == 1:
        return table[:, idx]
    return torch.gather(table, 1, idx[..., None].expand(-1, -1, table.shape[-1]))


@operator_under_compile("index_add_rows", lambda rows, index, n_out: rows.new_empty(n_out, rows.shape[1]))
def index_add_rows(rows: torch.Tensor, index: torch.Tensor, n_out: int) -> torch.Tensor:
    """rows (N, H), index (N,) in [0, n_out) -> (n_out, H): out[i] sums the rows whose index is i, added in
    row order (index_add_'s documented order; on a CPU each row's sum in index order, so deterministic).
    An operator under compile (`operator_under_compile`): the compiled graph calls ATen's kernel instead of
    lowering it (inductor's own scatter is ~2x slower on a CPU, and the gather-and-add form, `_segment_sum`,
    compiles ~4 s longer). On CUDA index_add_ adds atomically, in no fixed order: the MLP's compiled CUDA
    step uses its planned gathers (`_segment_sum`) instead; the transformer's lookups still go through this
    operator there (docs/training.md, On a GPU)."""
    return rows.new_zeros(n_out, rows.shape[1]).index_add_(0, index, rows)


def flat_row_index(idx: torch.Tensor, R: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """idx (M, N) in [0, R) -> (M * N,) rows of the (M * R [+ 1], ...) stack of the M models' tables:
    idx[m, n] + m * R; with keep (M, N) bool, the rows left out (a padded model's padding) go to a last
    row, M * R, that the sum drops."""
    M, N = idx.shape
    flat = idx + torch.arange(M, device=idx.device)[:, None] * R
    if keep is not None:
        flat = torch.where(keep, flat, M * R)
    return flat.reshape(M * N)


def _scatter_rows(grad_rows: torch.Tensor, idx: torch.Tensor, R: int, flat: torch.Tensor | None = None) -> torch.Tensor:
    """Adjoint of _rows: (M, N, H) -> (M, R, H), summing rows that share an index, each sum in row order.
    Per-model idx (M, N): by `index_add_rows` over the models' stacked tables (the same sums, in the same
    order, as scatter_add_ along N, in a seventh of its time on a CPU: 1.0 vs 6.9 ms at p = 59, M = 12,
    H = 256); `flat` (`flat_row_index`, optional) its row index, built once."""
    M, N, H = grad_rows.shape
    if idx.dim() == 1:
        return grad_rows.new_zeros(M, R, H).index_add_(1, idx, grad_rows)
    if flat is None:
        flat = flat_row_index(idx, R)
    out = index_add_rows(grad_rows.reshape(M * N, H), flat, M * R + 1)     # + the left-out rows' row
    return out[:M * R].view(M, R, H)




def _row_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^T y over the rows: (M, N, A), (M, N, B) -> (M, A, B), as bmms over blocks of exactly ROW_BLOCK rows
    (the last padded with zero rows) added in order. Zero rows appended (a padded model's) then change no
    bit: BLAS picks its blocking of the summed axis from its length, so one bmm over n rows and over n rows
    + zeros can differ (on an AVX-512 CPU from n + zeros >= 400, on a Zen 5 one from n = 144,
    benchmarks/padding_sums.py); with blocks of one length, the first blocks are the same products, the
    last holds the same rows, the rest of it zeros either way, and whole blocks of zeros add exact zeros."""
    N = x.shape[1]
    out = None
    for lo in range(0, N, ROW_BLOCK):
        xs, ys = x[:, lo:lo + ROW_BLOCK], y[:, lo:lo + ROW_BLOCK]
        if xs.shape[1] < ROW_BLOCK:
            pad = (0, 0, 0, ROW_BLOCK - xs.shape[1])
            xs, ys = F.pad(xs, pad), F.pad(ys, pad)
        term = torch.bmm(xs.transpose(1, 2), ys)
        out = term if out is None else out + term
    return out


class _RowLinear(torch.autograd.Function):
    """x W per model: x (M, R, A) rows, W (M, A, B) -> (M, R, B). Its backward takes dW = x^T dy by
    `_row_product`, so rows appended with dy = 0 (a padded model's) change no bit of dW, as in the MLP's
    hand-written backward; autograd's own bmm backward sums the R rows in one BLAS call, whose blocking
    follows R (at p = 59, 1,000 rows and 1,000 + 400 zero rows gave another dW for every matrix)."""

    @staticmethod
    def forward(x, W):
        return torch.bmm(x, W)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        dx = torch.bmm(dy, W.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dW = _row_product(x, dy) if ctx.needs_input_grad[1] else None
        return dx, dW


class _Lookup(torch.autograd.Function):
    """`_rows` with `_scatter_rows` (index_add_: rows added in index order) as its backward; autograd's
    own indexing backward accumulates in an order that, with two threads, followed the number of rows."""

    @staticmethod
    def forward(table, idx):
        return _rows(table, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        table, idx = inputs
        ctx.save_for_backward(idx)
        ctx.n_rows = table.shape[1]

    @staticmethod
    def backward(ctx, grad_rows):
        (idx,) = ctx.saved_tensors
        return _scatter_rows(grad_rows, idx, ctx.n_rows), None


def _row_sum(rows: torch.Tensor) -> torch.Tensor:
    """The sum over the rows: (M, N, H) -> (M, 1, H), by `row_sum`'s fixed order (blocks of ROW_BLOCK rows,
    halving trees, block sums in order): each model's sum has the same bits whatever M (a bmm with a column
    of ones, `_row_product(ones, rows)`, did not: one model's 1-row product went another BLAS path than
    three's) and whatever zero rows follow its own."""
    return row_sum(rows)[:, None]


class _Broadcast(torch.autograd.Function):
    """A row per model used by every sample: row (M, 1, H), n -> (M, n, H) (an expand). Its backward sums
    the n rows' gradients by `_row_sum`, so rows appended with a zero gradient (a padded model's) change no
    bit of the row's gradient, nor does the number of models."""

    @staticmethod
    def forward(row, n):
        return row.expand(-1, n, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_rows):
        return _row_sum(grad_rows), None


def row_linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x (M, ..., A) @ W (M, A, B) -> (M, ..., B), every leading index of x after M a row (`_RowLinear`)."""
    M, A = x.shape[0], x.shape[-1]
    return _RowLinear.apply(x.reshape(M, -1, A), W).view(*x.shape[:-1], W.shape[-1])


def segment_plan(idx: torch.Tensor, R: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each value, for a gather-and-sum adjoint of `_rows` (built once per split).

    idx (M, N) with values in [0, R) -> slot (M, R, K) int64, valid (M, R, K) bool: slot[m, r, :count]
    lists, in increasing order, the rows n with idx[m, n] == r; K is the largest count, the rest is
    padding (valid False, slot 0). keep (M, N) bool, optional: rows left out where False (a padded
    model's padding, which repeats its first row and carries a zero gradient: counted, it made that
    value's list, and K, thousands long, and the unrolled sum took compilation past 15 minutes).
    """
    M, N = idx.shape
    if keep is not None:
        idx = torch.where(keep, idx, R)                             # left-out rows: a value past the last
    order = torch.argsort(idx, dim=1, stable=True)                  # (M, N) rows grouped by value
    counts = torch.zeros(M, R + 1, dtype=torch.int64, device=idx.device).scatter_add_(
        1, idx, torch.ones_like(idx))[:, :R]
    K = max(int(counts.max()), 1)
    start = torch.cumsum(counts, 1) - counts                        # (M, R) first slot of each value
    k = torch.arange(K, device=idx.device)
    valid = k < counts[..., None]                                   # (M, R, K)
    pos = (start[..., None] + k).clamp_max(N - 1).reshape(M, R * K)
    slot = torch.where(valid, torch.gather(order, 1, pos).view(M, R, K), 0)
    return slot, valid


def _segment_sum(rows: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Adjoint of _rows by the plan of `segment_plan`: (M, N, H) -> (M, R, H), no scatter.

    One gather viewed as (M, R, K, H), its K slices added in slot order: the compiler emits one
    pointwise kernel with K row loads, vectorised along H (a `.sum` over K makes it vectorise along K
    with scalar gathers, ~5x slower; inductor's scatter_add is ~2x slower). Each output row adds its
    rows in increasing order, as scatter_add does: the same bits. Eager, the gather is materialised
    and costs more than one scatter_add: use it under torch.compile.
    """
    M, N, H = rows.shape
    _, R, K = slot.shape
    g = torch.gather(rows, 1, slot.reshape(M, R * K, 1).expand(-1, -1, H)).view(M, R, K, H)
    g = torch.where(valid[..., None], g, 0.0)
    out = g[:, :, 0]
    for k in range(1, K):
        out = out + g[:, :, k]
    return out                                                      # (M, R, H)


class MLP:
    """The study's MLP: z = GeLU([E[a], E[b]] W1 + b1) W2 + b2, all with a leading model axis.

    The first layer uses the table form: [E[a], E[b]] W1 = (E W1_top)[a] + (E W1_bot)[b], a p-row
    product instead of an N-row one (exact algebra; equal to the direct form within float rounding).
    Its backward sums dL/dpre over the rows of each table entry, in row order: by `index_add_rows` (CPU,
    and eager CUDA), or on CUDA under torch.compile by the gathers of a `plan` built once for the fixed
    train rows (see `_segment_sum`).
    """

    def __init__(self, cfg: TrainConfig):
        p, d, H = cfg.p, cfg.d_embed, cfg.hidden
        self.p, self.d = p, d
        self.layout = ParamLayout(names=("E", "W1", "W2", "b1", "b2"),
                                  shapes=((p, d), (2 * d, H), (H, p), (H,), (p,)), n_matrices=3,
                                  fans=(d, 2 * d, H))              # the study's code: E / sqrt(d), not sqrt(p)
        self.hidden = ("W1",)
        """The hidden matrices (Muon's; the embedding E and the output layer W2 are not)."""

    def plan(self, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
        """Index plan of loss_and_grads' backward for fixed rows a, b (M, N); build it once per split.
        keep (M, N) bool: the rows that count (False: padding, whose gradient is zero). On a CPU the flat
        row indices of `index_add_rows`; on CUDA, whose index_add_ adds in no fixed order, the gathers of
        `segment_plan`."""
        if a.device.type == "cpu":
            return {"flat_a": flat_row_index(a, self.p, keep), "flat_b": flat_row_index(b, self.p, keep)}
        sa, va = segment_plan(a, self.p, keep)
        sb, vb = segment_plan(b, self.p, keep)
        return {"slot_a": sa, "valid_a": va, "slot_b": sb, "valid_b": vb}

    def _tables(self, P):
        d = self.d
        TA = torch.bmm(P["E"], P["W1"][:, :d])                      # (M, p, H)
        TB = torch.bmm(P["E"], P["W1"][:, d:])                      # (M, p, H)
        return TA, TB

    def _hidden_pre(self, P, a, b):
        TA, TB = self._tables(P)
        pre = _rows(TA, a) + _rows(TB, b) + P["b1"][:, None]        # (M, N, H)
        return pre

    def logits(self, flat, a, b):
        P = self.layout.views(flat)
        h = F.gelu(self._hidden_pre(P, a, b))                       # (M, N, H)
        return torch.bmm(h, P["W2"]) + P["b2"][:, None]            # (M, N, V)

    def loss_and_grads(self, flat, a, b, y, lossfn, plan: dict | None = None):
        """Forward, fused loss, hand-written backward. Returns (loss (M,), grad (M, P), stats).

        `plan` (from `self.plan(a, b)`, optional), built once per split: on a CPU the flat row indices of
        the sums (`flat_row_index`), on CUDA the gathers that replace the atomic index_add_ (`_segment_sum`;
        used by the compiled step).
        """
        P = self.layout.views(flat)
        d, M = self.d, flat.shape[0]
        # forward for all M models
        TA, TB = self._tables(P)                                    # (M, p, H)
        pre = _rows(TA, a) + _rows(TB, b) + P["b1"][:, None]        # (M, N, H)
        h = F.gelu(pre)
        # bmm, then the bias: the same bits as baddbmm (measured with MKL on an AVX-512 CPU, eager and
        # compiled), whose path took 1.5x the bmm's time (6.1 vs 3.9 ms at p = 59, M = 12, 1 thread);
        # compiled, the add fuses into the loss's kernel
        z = torch.bmm(h, P["W2"]) + P["b2"][:, None]                # (M, N, V)
        # fused loss: per-model mean, dL/dz and readouts in one call
        loss, dz, stats = lossfn(z, y)
        # backward
        # as (dz^T h)^T: the same sums as h^T dz, in 0.7x the time (MKL prefers this layout; the same bits
        # there, measured on an AVX-512 CPU: another BLAS may block the two layouts differently)
        dW2 = _row_product(dz, h).transpose(1, 2)                   # (M, H, V)
        db2 = dz.sum(1)                                             # (M, V)
        if torch.compiler.is_compiling():
            # GeLU' needs pre again: summed in another order (equal to float rounding) the compiler
            # does not merge it with the forward's and recomputes it from the small tables inside the
            # backward's kernel, instead of writing and re-reading (M, N, H) floats (~10% of a step)
            pre = _rows(TA, a) + (_rows(TB, b) + P["b1"][:, None])
        dpre = torch.ops.aten.gelu_backward(torch.bmm(dz, P["W2"].transpose(1, 2)), pre)  # (M, N, H)
        if plan is not None and "slot_a" in plan:
            dTA = _segment_sum(dpre, plan["slot_a"], plan["valid_a"])
            dTB = _segment_sum(dpre, plan["slot_b"], plan["valid_b"])
        else:
            plan = plan or {}
            dTA = _scatter_rows(dpre, a, self.p, plan.get("flat_a"))    # (M, p, H)
            dTB = _scatter_rows(dpre, b, self.p, plan.get("flat_b"))
        db1 = dTA.sum(1)                                            # (M, H): every row is in one segment
        W1a, W1b = P["W1"][:, :d], P["W1"][:, d:]                   # (M, d, H)
        Et = P["E"].transpose(1, 2)                                 # (M, d, p)
        dW1 = torch.cat([torch.bmm(Et, dTA), torch.bmm(Et, dTB)], 1)  # (M, 2d, H)
        dE = torch.bmm(dTA, W1a.transpose(1, 2)) + torch.bmm(dTB, W1b.transpose(1, 2))  # (M, p, d)
        grad = torch.cat([dE.reshape(M, -1), dW1.reshape(M, -1), dW2.reshape(M, -1), db1, db2], 1)
        return loss, grad, stats


class Transformer:
    """Transformer on tokens [a, b, =] (or [a, op, b, =]): n_layers blocks of causal attention then an MLP,
    learned positions, a residual stream, a separate unembedding read at the last position.

    fastgrok's own (every tf_* setting at its default): no biases, GeLU, optional pre-LayerNorm (gains
    and biases are vectors: no decay, no clamp), init token and position embeddings / sqrt(d_model), the
    rest / sqrt(fan_in) (see `fans` below). The tf_* settings give the peers' conventions (config.py,
    TF_PRESETS; docs/training.md): the op token, logits over the whole vocabulary, ReLU, biases, Lee et
    al.'s block (the residual stream through LN1) and PyTorch's or Nanda et al.'s initial weights.

    `logits` skips work whose value is the same or discarded (issue 31; exact algebra, so it equals the direct
    computation, `_logits_full`, to float rounding: float64 within 1e-12 relative, float32 at rounding level):
    block 0's LN1, Q, K and V are per-position tables over the tokens a position can hold (p rows at a and
    b, one row per model at the op and "="), gathered per pair, and the last block runs its attention, W_O,
    LN2 and MLP at the last position only (the one the unembedding reads). In one layer, per pair only the
    attention mix (over tabled scores and values), W_O, the MLP and W_U run. Every new sum over rows keeps
    batched == solo bitwise (`_Lookup`, `_Broadcast`).
    """

    def __init__(self, cfg: TrainConfig):
        p, D, Hm, L = cfg.p, cfg.d_model, cfg.d_mlp, cfg.n_layers
        self.p, self.D, self.heads, self.n_layers, self.ln = p, D, cfg.n_heads, L, cfg.layernorm
        self.op_token = cfg.tf_tokens == "a op b ="
        self.T = 4 if self.op_token else 3                              # sequence length
        self.vocab = p + 1 + self.op_token                              # "=" is token p, the op p + 1
        self.n_out = self.vocab if cfg.tf_unembed == "vocab" else p
        self.act = F.relu if cfg.tf_act == "relu" else F.gelu
        self.bias, self.lee = cfg.tf_bias, cfg.tf_block == "lee"
        names, shapes = ["W_E", "W_pos"], [(self.vocab, D), (self.T, D)]
        for i in range(L):
            names += [f"W_Q{i}", f"W_K{i}", f"W_V{i}", f"W_O{i}", f"W_in{i}", f"W_out{i}"]
            shapes += [(D, D)] * 4 + [(D, Hm), (Hm, D)]
        names.append("W_U")
        shapes.append((D, self.n_out))
        n_mat = len(names)
        for i in range(L):
            if self.bias == "all":
                names += [f"b_Q{i}", f"b_K{i}", f"b_V{i}", f"b_O{i}"]
                shapes += [(D,)] * 4
            if self.bias != "none":
                names += [f"b_in{i}", f"b_out{i}"]
                shapes += [(Hm,), (D,)]
        if self.ln:
            for i in range(L):
                names += [f"ln1_{i}_g", f"ln1_{i}_b", f"ln2_{i}_g", f"ln2_{i}_b"]
                shapes += [(D,)] * 4
            names += ["lnf_g", "lnf_b"]
            shapes += [(D,)] * 2
        uniform = ()
        if cfg.tf_init == "nanda":
            # progress-measures-paper: every matrix N(0, 1)/sqrt(d_model), W_U N(0, 1)/sqrt(d_vocab)
            fans = tuple(self.n_out if n == "W_U" else D for n in names[:n_mat])
        else:
            # token and position embeddings N(0, 1)/sqrt(d_model), as the MLP's E and the grokking transformers
            # (Nanda et al.); every other matrix N(0, 1)/sqrt(fan_in). Positions drawn / sqrt(3) (their rows)
            # outweighed the tokens 4.5x in the residual stream and halved the speed of memorisation.
            fans = tuple(D if n in ("W_E", "W_pos") else shape[0] for n, shape in zip(names[:n_mat], shapes[:n_mat]))
        if cfg.tf_init == "torch":
            # Lee et al.'s PyTorch defaults: nn.Embedding N(0, 1); nn.MultiheadAttention's in_proj_weight
            # (3D, D) Xavier-uniform, sqrt(6 / (D + 3D)), its biases 0; out_proj and the nn.Linear layers
            # kaiming_uniform(a=sqrt(5)), U(+-1/sqrt(fan_in)), nn.Linear's bias alike; LayerNorm 1, 0
            fans = tuple(1 if n in ("W_E", "W_pos") else f for n, f in zip(names, fans))
            xavier = math.sqrt(6.0 / (4 * D))
            fan_in = {"W_in": D, "W_out": Hm, "b_in": D, "b_out": Hm}
            uniform = tuple(None if n in ("W_E", "W_pos") or n.startswith("ln") or n[:3] in ("b_Q", "b_K", "b_V", "b_O")
                            else xavier if n[:3] in ("W_Q", "W_K", "W_V")
                            else 1 / math.sqrt(fan_in.get(n.rstrip("0123456789"), D)) for n in names)
        self.layout = ParamLayout(names=tuple(names), shapes=tuple(shapes), n_matrices=n_mat, fans=fans,
                                  uniform=uniform)
        self.hidden = tuple(n for n in names[:n_mat] if n not in ("W_E", "W_pos", "W_U"))
        """The hidden matrices: every block's attention and MLP matrices (Muon's; not the embeddings or W_U)."""

    def _norm(self, x, P, name):
        if not self.ln:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        g, b = P[name + "_g"].view(shape), P[name + "_b"].view(shape)
        return F.layer_norm(x, x.shape[-1:]) * g + b

    def _linear(self, x, P, w, b):
        """row_linear(x, P[w]) plus the bias P[b] where the model has it."""
        y = row_linear(x, P[w])
        return y + P[b].view((y.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)) if b in P else y

    def tokens(self, a, b):
        """The input sequences: (N, T) or (M, N, T) token ids."""
        eq = torch.full_like(a, self.p)
        if self.op_token:
            return torch.stack([a, torch.full_like(a, self.p + 1), b, eq], -1)
        return torch.stack([a, b, eq], -1)

    def logits(self, flat, a, b):
        """Logits (M, N, n_out), by two exact rewrites of `_logits_full`. Block 0's input at position t is
        W_E[tok_t] + W_pos[t], a function of the token at t alone: its LN1, Q, K, V (and Lee's residual
        ln_1(x)) are tables over the tokens that can appear there (p rows at a and b, one row per model at
        the op and "="), gathered per sample. The last block's output is read at the last position only:
        K and V at every position, Q, the attention, W_O, LN2 and the MLP at the last. In one layer that
        query is "="'s, one row per model, so the scores are a table as well (every row's key against it)."""
        P = self.layout.views(flat)
        T, L, p, N = self.T, self.n_layers, self.p, a.shape[-1]
        varying = {0: a, T - 2: b}                                      # positions of a and b; the rest constant
        const = {T - 1: p, 1: p + 1} if self.op_token else {T - 1: p}   # "=" and the op token
        x0, idx, off = [], [], 0
        for t in range(T):                  # block 0's input rows, position after position: p rows or 1
            E = P["W_E"][:, :p] if t in varying else P["W_E"][:, const[t]:const[t] + 1]
            x0.append(E + P["W_pos"][:, t:t + 1])
            idx.append(varying[t] + off if t in varying else torch.full_like(a, off))
            off += E.shape[1]
        x0 = torch.cat(x0, 1)                                           # (M, R, D), R = 2p + T - 2
        idx = torch.stack(idx, -1).flatten(-2)                          # (N T,) or (M, N T): each sample's rows
        h = self._norm(x0, P, "ln1_0")
        k = self._linear(h, P, "W_K0", "b_K0")                          # (M, R, D)
        v = _Lookup.apply(self._linear(h, P, "W_V0", "b_V0"), idx).unflatten(1, (N, T))  # (M, N, T, D)
        res = h if self.lee else x0                                     # Lee et al.: x = ln_1(x)
        if L == 1:
            # only "=" is read: its query is one row per model, so the scores too are a table, each row's
            # key against that query; the residual at "=", one row per model
            q = _Broadcast.apply(self._linear(h[:, -1:], P, "W_Q0", "b_Q0"), k.shape[1])
            s = _Lookup.apply(self._scores(q, k), idx).unflatten(1, (N, T))            # (M, N, T, Nh)
            x = self._block_last(s, v, _Broadcast.apply(res[:, -1:], N), P, 0)        # (M, N, D)
        else:
            q, k = (_Lookup.apply(y, idx).unflatten(1, (N, T)) for y in (self._linear(h, P, "W_Q0", "b_Q0"), k))
            x = self._block_all(q, k, v, _Lookup.apply(res, idx).unflatten(1, (N, T)), P, 0)
        for i in range(1, L):
            h = self._norm(x, P, f"ln1_{i}")
            if self.lee:                                                # Lee et al.: x = ln_1(x); x = x + attn(x)
                x = h
            k, v = (self._linear(h, P, f"W_{c}{i}", f"b_{c}{i}") for c in "KV")
            if i == L - 1:
                q = self._linear(h[:, :, -1], P, f"W_Q{i}", f"b_Q{i}")                   # (M, N, D)
                x = self._block_last(self._scores(q.unsqueeze(2), k), v, x[:, :, -1], P, i)   # (M, N, D)
            else:
                x = self._block_all(self._linear(h, P, f"W_Q{i}", f"b_Q{i}"), k, v, x, P, i)
        x = self._norm(x, P, "lnf")                                     # (M, N, D)
        return row_linear(x, P["W_U"])                                  # (M, N, n_out)

    def _block_all(self, q, k, v, x, P, i):
        """Block i after its Q, K, V (M, N, T, D) at every position: causal attention, W_O, LN2 and the MLP
        on the residual x (M, N, T, D)."""
        T, Nh, dh = q.shape[2], self.heads, self.D // self.heads
        q, k, v = (y.unflatten(-1, (Nh, dh)).transpose(2, 3) for y in (q, k, v))    # (M, N, Nh, T, dh)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)                 # (M, N, Nh, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(2, 3).flatten(-2)                       # (M, N, T, D)
        return self._block_out(o, x, P, i)

    def _scores(self, q, k):
        """Attention scores q.k / sqrt(dh) per head, q broadcast against k (..., D) -> (..., Nh): elementwise
        products and a sum over dh (on a CPU faster than bmms of one query row)."""
        Nh, dh = self.heads, self.D // self.heads
        return (q * k).unflatten(-1, (Nh, dh)).sum(-1) / math.sqrt(dh)

    def _block_last(self, s, v, x, P, i):
        """Block i at the last position only, from its scores s (M, N, T, Nh) against every position (no
        mask needed) and the values v (M, N, T, D): the attention mix, W_O, LN2 and the MLP on its residual
        x (M, N, D)."""
        att = s.softmax(2).unsqueeze(-1)                                # (M, N, T, Nh, 1)
        o = (att * v.unflatten(-1, (self.heads, self.D // self.heads))).sum(2).flatten(-2)   # (M, N, D)
        return self._block_out(o, x, P, i)

    def _block_out(self, o, x, P, i):
        """The residual stream after block i's attention output o: x + o W_O, then + MLP(LN2(x))."""
        x = x + self._linear(o, P, f"W_O{i}", f"b_O{i}")
        h = self._norm(x, P, f"ln2_{i}")
        return x + self._linear(self.act(self._linear(h, P, f"W_in{i}", f"b_in{i}")), P, f"W_out{i}", f"b_out{i}")

    def _logits_full(self, flat, a, b):
        """The direct computation `logits` rewrites: every block at every position, block 0 on the gathered
        rows W_E[tok] + W_pos (the reference of tests/test_transformer_tables.py)."""
        P = self.layout.views(flat)
        M, T = flat.shape[0], self.T
        tok = self.tokens(a, b)                                         # (N, T) or (M, N, T)
        idx = tok.reshape(-1) if tok.dim() == 2 else tok.reshape(M, -1)
        x = _Lookup.apply(P["W_E"], idx).view(M, -1, T, self.D)         # (M, N, T, D)
        x = x + P["W_pos"][:, None]                                     # (M, N, T, D)
        for i in range(self.n_layers):
            h = self._norm(x, P, f"ln1_{i}")
            if self.lee:                                                # Lee et al.: x = ln_1(x); x = x + attn(x)
                x = h
            q, k, v = (self._linear(h, P, f"W_{c}{i}", f"b_{c}{i}") for c in "QKV")   # (M, N, T, D)
            x = self._block_all(q, k, v, x, P, i)
        x = self._norm(x[:, :, -1], P, "lnf")                           # (M, N, D)
        return row_linear(x, P["W_U"])                                  # (M, N, n_out)

    def loss_and_grads(self, flat, a, b, y, lossfn):
        with torch.enable_grad():
            leaf = flat.detach().requires_grad_(True)
            z = self.logits(leaf, a, b)
            loss, dz, stats = lossfn(z.detach(), y)
            (grad,) = torch.autograd.grad(z, leaf, dz)
        return loss, grad, stats


class PeerMLP:
    """The peers' MLP (issue 30): input, depth, activation and biases set by the config's mlp_* fields.

    z = act(... act(x W1 + b1) ...) W{L+1} + b{L+1}: L = mlp_layers hidden layers of width `hidden`, x the
    study's embedding [E[a], E[b]] (2 d_embed inputs) or the one-hot of a and of b concatenated (2p inputs;
    x W1 = W1[a] + W1[p + b], the rows a one-hot product picks). Prieto et al.'s MLP is one-hot, L = 2,
    hidden 200, ReLU, no biases. Autograd backward; each product's dW is taken by `row_linear` and each
    lookup's by `_Lookup`, so a padded model's zero rows change no bit (as the study's MLP). The study's own
    setting (config.STUDY_MLP) is built as `MLP`, never as this class.
    """

    def __init__(self, cfg: TrainConfig):
        p, H, L = cfg.p, cfg.hidden, cfg.mlp_layers
        self.p, self.n_layers, self.onehot = p, L, cfg.mlp_input == "onehot"
        self.act = F.relu if cfg.mlp_act == "relu" else F.gelu
        names, shapes, fans = [], [], []
        if not self.onehot:
            names, shapes, fans = ["E"], [(p, cfg.d_embed)], [cfg.d_embed]    # the study's E / sqrt(d)
        widths = [2 * p if self.onehot else 2 * cfg.d_embed] + [H] * L + [p]
        for i in range(L + 1):                      # W{i+1}: (in, out), N(0, 1) / sqrt(in) (init "model")
            names.append(f"W{i + 1}")
            shapes.append((widths[i], widths[i + 1]))
            fans.append(widths[i])
        n_mat = len(names)
        if cfg.mlp_bias:
            names += [f"b{i + 1}" for i in range(L + 1)]
            shapes += [(w,) for w in widths[1:]]
        self.layout = ParamLayout(names=tuple(names), shapes=tuple(shapes), n_matrices=n_mat, fans=tuple(fans))
        self.hidden = tuple(f"W{i + 1}" for i in range(1 if self.onehot else 0, L))
        """The hidden matrices (Muon's): W1 .. WL after an embedding; W2 .. WL on one-hot inputs, where W1
        is the input embedding (a one-hot row picks a row of it). Never E or the output layer."""

    def logits(self, flat, a, b):
        P = self.layout.views(flat)
        if self.onehot:
            x = _Lookup.apply(P["W1"], a) + _Lookup.apply(P["W1"], b + self.p)    # (M, N, H)
        else:
            x = row_linear(torch.cat([_Lookup.apply(P["E"], a), _Lookup.apply(P["E"], b)], -1), P["W1"])
        for i in range(1, self.n_layers + 2):
            if i > 1:
                x = row_linear(self.act(x), P[f"W{i}"])                         # (M, N, H) or (M, N, V)
            if f"b{i}" in P:
                x = x + P[f"b{i}"][:, None]
        return x                                                                # (M, N, V)

    loss_and_grads = Transformer.loss_and_grads
    """Forward, loss, autograd backward over this class's `logits` (the transformer's step)."""


def build_model(cfg: TrainConfig):
    """The study's MLP (table form, hand-written backward) at config.STUDY_MLP, else the peers' MLP; or
    the transformer."""
    if cfg.model != "mlp":
        return Transformer(cfg)
    return MLP(cfg) if cfg.study_mlp else PeerMLP(cfg)


def step_flops(cfg: TrainConfig) -> float:
    """Nominal FLOPs of one model's training step: forward and backward, 3 products with each weight matrix
    it uses (2 FLOPs a multiply-add), per train pair, on a minibatch's rows where the models draw
    minibatches (batch_size), else on every train pair. The MLPs in the direct form (no table tricks): 2d x H
    (2p x H on one-hot inputs), the other hidden layers' H x H and H x V. The transformer as it runs
    (`Transformer.logits`): per pair W_O and the MLP on its T tokens (3, 4 with an op token) in block 0
    (only at the last in a 1-layer model), every product at every token in the middle blocks, K and V at
    every token and Q, W_O and the MLP at the last in the last block, and the unembedding; per step,
    block 0's Q, K, V tables (2p + T - 2 rows; Q only on "=" in a 1-layer model). The attention's scores
    and mix (no weight matrix) are not counted.
    The one cost model of time: `fastgrok experiments` scales its CPU time by it (grid.sizes) and
    `fastgrok bench` reports FLOP/s against it (bench.sections)."""
    per_step = 0
    if cfg.model == "mlp":
        n_in = 2 * cfg.p if cfg.mlp_input == "onehot" else 2 * cfg.d_embed
        per_pair = n_in * cfg.hidden + (cfg.mlp_layers - 1) * cfg.hidden ** 2 + cfg.hidden * cfg.p
    else:
        d, L, T = cfg.d_model, cfg.n_layers, len(cfg.tf_tokens.split())
        mlp = 2 * d * cfg.d_mlp
        n_out = cfg.p + T - 2 if cfg.tf_unembed == "vocab" else cfg.p       # the vocabulary: p, "=", the op
        if L == 1:
            per_pair = d * d + mlp                                      # W_O and the MLP at "="
        else:
            per_pair = (T * (d * d + mlp)                               # block 0: W_O, MLP at every token
                        + (L - 2) * T * (4 * d * d + mlp)               # the middle blocks
                        + T * 2 * d * d + 2 * d * d + mlp)              # last: K, V at every token; Q, W_O, MLP
        per_pair += d * n_out                                           # the unembedding
        table_rows = 2 * cfg.p + T - 2                                  # block 0's tables: a, b, "=" (, op)
        per_step = table_rows * 2 * d * d + (table_rows if L > 1 else 1) * d * d          # K, V; Q
    # the rows a step trains: a minibatch (the batch's largest) or every train pair
    rows = max(cfg.n_train if b is None else min(b, cfg.n_train) for b in cfg.values("batch_size"))
    return 6.0 * (rows * per_pair + per_step)
