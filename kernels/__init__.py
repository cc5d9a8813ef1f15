"""fastgrok.kernels: the tempered cross-entropy and the weight-norm clamp, and the one dispatch point.

Dispatch rule (`backend`):
  "auto"   -> Triton when the tensor is on CUDA and Triton imports, else the PyTorch reference.
  "triton" -> the Triton kernel; on a CPU tensor only under TRITON_INTERPRET=1 (the interpreter).
  "torch"  -> the PyTorch reference twin (kernels/reference.py); the only path for float64.
The trainer never checks the device itself: it passes its `kernels` setting here.

Loss kinds: `loss="ce"|"mse"` sets one loss for every model; a `kind` tensor (M,) of codes (LOSS_KINDS:
0 softmax CE, 1 StableMax CE, 2 MSE, all on s = z/tau) sets each model's own, mixed in one launch. With
neither, every model is softmax CE by the code path that predates kinds, bit for bit. `loss="mse"` runs
on the Triton kernel too (every model kind 2). The readouts are the same for every kind (softmax(z/tau)).

The Triton paths are `torch.library` custom operators with fake implementations (and, for the loss,
autograd), so `torch.compile(fullgraph=True)` traces a step that calls them without a graph break. The
reference path is plain torch code that the compiler sees and fuses.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from .reference import (LOSS_KINDS, check_ce_inputs, clamp_flat_reference_, clamp_list_reference_,
                        tempered_ce_reference, tempered_mse_reference, working_dtype)

BACKENDS = ("auto", "triton", "torch")


class BackendError(ValueError):
    """The requested kernel backend cannot run here (the message says why)."""


LOSSES = ("ce", "mse")


class CEStats(NamedTuple):
    """Per-row readouts, the same for every loss kind (collapse is softmax's, kept comparable across losses)."""
    correct: torch.Tensor     # (M, N) bool: argmax(z/tau) == label
    collapsed: torch.Tensor   # (M, N) bool: softmax(z/tau)_label == 1.0 exactly
    logit_norm: torch.Tensor  # (M, N) float: ||z/tau||_2
    row_loss: torch.Tensor    # (M, N) float: the row's own loss (its model's kind), unweighted, every row
                              #   (masked-out ones too): loss over any row subset from one pass


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether triton is installed (looked up once, at import: dispatch runs inside compiled steps, where
    older torch.compile versions cannot trace importlib)."""
    return _HAS_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """'torch' or 'triton' for tensors on `device` of `dtype`, by the rule in the module docstring."""
    if backend not in BACKENDS:
        raise BackendError(f"kernels backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        ok = device.type == "cuda" and triton_available() and dtype != torch.float64
        return "triton" if ok else "torch"
    if not triton_available():
        raise BackendError("kernels=triton needs the triton package (pip install triton)")
    if dtype == torch.float64:
        raise BackendError("kernels=triton supports float32/bfloat16/float16; float64 runs on kernels=torch")
    if device.type != "cuda" and not interpreting():
        raise BackendError("kernels=triton on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return "triton"


# --------------------------------------------------------------------------------------------------
# Custom operators around the Triton kernels
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastgrok::tempered_ce", mutates_args=())
def _tempered_ce_op(logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    from .cross_entropy import tempered_ce_triton
    return tempered_ce_triton(logits, labels, tau, mask, kind)


@_tempered_ce_op.register_fake
def _(logits, labels, tau, mask, kind):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    return (logits.new_empty((M,), dtype=wdt), logits.new_empty((M, N, V)),  # contiguous, as the kernel's
            logits.new_empty((M, N), dtype=torch.bool), logits.new_empty((M, N), dtype=torch.bool),
            logits.new_empty((M, N), dtype=wdt), logits.new_empty((M, N), dtype=wdt))


def _ce_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[4], output[5])   # only the loss carries a gradient (as _TorchCE)


def _ce_backward(ctx, g_loss, g_grad, g_correct, g_collapsed, g_norm, g_row):
    (grad,) = ctx.saved_tensors                       # (M, N, V), owned by this op, never mutated
    if g_loss is None:
        return None, None, None, None, None
    return grad * g_loss.to(grad.dtype)[:, None, None], None, None, None, None


_tempered_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("fastgrok::tempered_ce_readouts", mutates_args=())
def _tempered_ce_readouts_op(logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor,
                             mask: Optional[torch.Tensor], kind: Optional[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .cross_entropy import tempered_ce_triton
    loss, _, correct, collapsed, norm, row = tempered_ce_triton(logits, labels, tau, mask, kind, write_grad=False)
    return loss, correct, collapsed, norm, row


@_tempered_ce_readouts_op.register_fake
def _(logits, labels, tau, mask, kind):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    return (logits.new_empty((M,), dtype=wdt), logits.new_empty((M, N), dtype=torch.bool),
            logits.new_empty((M, N), dtype=torch.bool), logits.new_empty((M, N), dtype=wdt),
            logits.new_empty((M, N), dtype=wdt))


@torch.library.custom_op("fastgrok::clamp_flat_", mutates_args=("flat",))
def _clamp_flat_op(flat: torch.Tensor, bounds: list[int], target: torch.Tensor,
                   active: torch.Tensor) -> torch.Tensor:
    from .norm_clamp import clamp_flat_triton_
    return clamp_flat_triton_(flat, bounds, target, active)


@_clamp_flat_op.register_fake
def _(flat, bounds, target, active):
    return flat.new_empty((flat.shape[0], len(bounds) - 1), dtype=working_dtype(flat.dtype))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

class _TorchCE(torch.autograd.Function):
    """Autograd wrapper of the reference: the gradient buffer is its own (computed in forward)."""

    @staticmethod
    def forward(ctx, logits, labels, tau, mask, kind):
        loss, grad, correct, collapsed, norm, row = tempered_ce_reference(logits, labels, tau, mask, kind)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct, collapsed, norm, row)
        return loss, correct, collapsed, norm, row

    @staticmethod
    def backward(ctx, g_loss, *_):
        (grad,) = ctx.saved_tensors
        return grad * g_loss.to(grad.dtype)[:, None, None], None, None, None, None


def _check_loss(loss: str, kind) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    if kind is not None and loss != "ce":
        raise ValueError(f"pass loss={loss!r} or a per-model kind tensor, not both (kind codes: {LOSS_KINDS})")


def _triton_kind(loss: str, kind, logits):
    """The kind tensor the Triton kernel gets: every model 2 for loss="mse", else `kind` (None: softmax only)."""
    if loss == "mse":
        return torch.full((logits.shape[0],), LOSS_KINDS["mse"], dtype=torch.int32, device=logits.device)
    return kind


def _reference(logits, labels, tau, mask, loss: str, kind):
    if loss == "mse":
        return tempered_mse_reference(logits, labels, tau, mask)
    return tempered_ce_reference(logits, labels, tau, mask, kind)


def tempered_cross_entropy(logits, labels, tau, mask=None, backend: str = "auto", kind=None):
    """Per-model mean of the loss of z/tau over masked rows, differentiable in `logits`, with fused readouts.

    kind (M,) int32/int64 or None: each model's loss code (LOSS_KINDS: 0 softmax CE, 1 StableMax CE,
    2 MSE); None = every model softmax CE. Returns (loss (M,), CEStats(correct, collapsed, logit_norm,
    row_loss)); only the loss carries a gradient. See kernels/reference.py for the math.
    """
    check_ce_inputs(logits, labels, tau, mask, kind)
    impl = resolve_backend(backend, logits.device, logits.dtype)
    if impl == "triton":
        loss, _, correct, collapsed, norm, row = _tempered_ce_op(logits, labels, tau, mask, kind)
    else:
        loss, correct, collapsed, norm, row = _TorchCE.apply(logits, labels, tau, mask, kind)
    return loss, CEStats(correct, collapsed, norm, row)


def loss_and_grad(logits, labels, tau, mask=None, backend: str = "auto", loss: str = "ce", kind=None,
                  check_kind: bool = True):
    """Forward and backward in one call, no autograd: (loss (M,), dlogits (M, N, V), CEStats).

    The trainer's hand-written backward starts from `dlogits`. loss: "ce" or "mse" for every model, or
    kind (M,) int32/int64 for each model its own (LOSS_KINDS: 0 softmax CE, 1 StableMax CE, 2 MSE; with
    loss="ce" only). Both run in one Triton launch; kind=None with loss="ce" is the softmax-only code.
    check_kind=False skips reading kind's codes on the host (a caller that built them, such as the
    trainer's step, which must not synchronise).
    """
    check_ce_inputs(logits, labels, tau, mask, kind, kind_values=check_kind)
    _check_loss(loss, kind)
    if resolve_backend(backend, logits.device, logits.dtype) == "triton":
        out = _tempered_ce_op(logits, labels, tau, mask, _triton_kind(loss, kind, logits))
    else:
        out = _reference(logits, labels, tau, mask, loss, kind)
    return out[0], out[1], CEStats(*out[2:])


def loss_and_stats(logits, labels, tau, mask=None, backend: str = "auto", loss: str = "ce", kind=None,
                   check_kind: bool = True):
    """`loss_and_grad` without the gradient, for evaluations: (loss (M,), CEStats). The Triton kernel then
    skips its gradient pass (no (M, N, V) buffer written); the reference computes and drops it (a compiled
    evaluation never materialises it). CEStats.row_loss gives the loss over any other rows (a test split)
    from the same pass: row_sum(row_loss * rows) / rows.sum(1) (reference.row_sum: the same order for any M)."""
    check_ce_inputs(logits, labels, tau, mask, kind, kind_values=check_kind)
    _check_loss(loss, kind)
    if resolve_backend(backend, logits.device, logits.dtype) == "triton":
        out = _tempered_ce_readouts_op(logits, labels, tau, mask, _triton_kind(loss, kind, logits))
        return out[0], CEStats(*out[1:])
    out = _reference(logits, labels, tau, mask, loss, kind)
    return out[0], CEStats(*out[2:])


def clamp_flat_(flat, bounds, target, active, backend: str = "auto"):
    """Clamp each segment of a flat (M, P) buffer to its per-model target, in place.

    bounds: S + 1 offsets; target (M, S); active (M,) bool. Returns the norms before, (M, S).
    """
    if resolve_backend(backend, flat.device, flat.dtype) == "triton":
        return _clamp_flat_op(flat, list(bounds), target, active)
    return clamp_flat_reference_(flat, list(bounds), target, active)


def clamp_norm_(params, target, backend: str = "auto"):
    """Set each model's total L2 norm over `params` (tensors with leading axis M) to target (M,).

    In place; returns the norms before the clamp (M,).
    """
    if not params:
        raise ValueError("clamp_norm_ needs at least one parameter tensor")
    M = params[0].shape[0]
    if tuple(target.shape) != (M,):
        raise ValueError(f"target must be (M,) = ({M},), got {tuple(target.shape)}")
    if resolve_backend(backend, params[0].device, params[0].dtype) == "triton":
        # Pack into one flat buffer so the kernel makes its two launches over contiguous memory.
        flat = torch.cat([p.reshape(M, -1) for p in params], 1)
        active = torch.ones(M, dtype=torch.bool, device=flat.device)
        norms = _clamp_flat_op(flat, [0, flat.shape[1]], target[:, None], active)[:, 0]
        off = 0
        for p in params:
            n = p[0].numel()
            p.copy_(flat[:, off:off + n].reshape(p.shape))
            off += n
        return norms
    return clamp_list_reference_(params, target)


__all__ = ["tempered_cross_entropy", "loss_and_grad", "loss_and_stats", "clamp_norm_", "clamp_flat_", "CEStats",
           "resolve_backend", "BackendError", "BACKENDS", "LOSSES", "LOSS_KINDS"]
