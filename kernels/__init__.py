"""fastgrok.kernels: the tempered cross-entropy and the weight-norm clamp, and the one dispatch point.

Dispatch rule (`backend`):
  "auto"   -> Triton when the tensor is on CUDA and Triton imports, else the PyTorch reference.
  "triton" -> the Triton kernel; on a CPU tensor only under TRITON_INTERPRET=1 (the interpreter).
  "torch"  -> the PyTorch reference twin (kernels/reference.py); the only path for float64.
The trainer never checks the device itself: it passes its `kernels` setting here.

The Triton paths are `torch.library` custom operators with fake implementations (and, for the loss,
autograd), so `torch.compile(fullgraph=True)` traces a step that calls them without a graph break. The
reference path is plain torch code that the compiler sees and fuses.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from .reference import (check_ce_inputs, clamp_flat_reference_, clamp_list_reference_, tempered_ce_reference,
                        tempered_mse_reference, working_dtype)

BACKENDS = ("auto", "triton", "torch")


class BackendError(ValueError):
    """The requested kernel backend cannot run here (the message says why)."""


class CEStats(NamedTuple):
    correct: torch.Tensor     # (M, N) bool: argmax(z/tau) == label
    collapsed: torch.Tensor   # (M, N) bool: softmax(z/tau)_label == 1.0 exactly
    logit_norm: torch.Tensor  # (M, N) float: ||z/tau||_2


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
def _tempered_ce_op(logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor,
                    mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    from .cross_entropy import tempered_ce_triton
    return tempered_ce_triton(logits, labels, tau, mask)


@_tempered_ce_op.register_fake
def _(logits, labels, tau, mask):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    return (logits.new_empty((M,), dtype=wdt), logits.new_empty((M, N, V)),  # contiguous, as the kernel's
            logits.new_empty((M, N), dtype=torch.bool), logits.new_empty((M, N), dtype=torch.bool),
            logits.new_empty((M, N), dtype=wdt))


def _ce_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[4])   # only the loss carries a gradient (as _TorchCE)


def _ce_backward(ctx, g_loss, g_grad, g_correct, g_collapsed, g_norm):
    (grad,) = ctx.saved_tensors                       # (M, N, V), owned by this op, never mutated
    if g_loss is None:
        return None, None, None, None
    return grad * g_loss.to(grad.dtype)[:, None, None], None, None, None


_tempered_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("fastgrok::tempered_ce_readouts", mutates_args=())
def _tempered_ce_readouts_op(logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor,
                             mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    from .cross_entropy import tempered_ce_triton
    loss, _, correct, collapsed, norm = tempered_ce_triton(logits, labels, tau, mask, write_grad=False)
    return loss, correct, collapsed, norm


@_tempered_ce_readouts_op.register_fake
def _(logits, labels, tau, mask):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    return (logits.new_empty((M,), dtype=wdt), logits.new_empty((M, N), dtype=torch.bool),
            logits.new_empty((M, N), dtype=torch.bool), logits.new_empty((M, N), dtype=wdt))


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
    def forward(ctx, logits, labels, tau, mask):
        loss, grad, correct, collapsed, norm = tempered_ce_reference(logits, labels, tau, mask)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct, collapsed, norm)
        return loss, correct, collapsed, norm

    @staticmethod
    def backward(ctx, g_loss, *_):
        (grad,) = ctx.saved_tensors
        return grad * g_loss.to(grad.dtype)[:, None, None], None, None, None


def tempered_cross_entropy(logits, labels, tau, mask=None, backend: str = "auto"):
    """Per-model mean of CE(z/tau) over masked rows, differentiable in `logits`, with fused readouts.

    Returns (loss (M,), CEStats(correct, collapsed, logit_norm)); see kernels/reference.py for the math.
    """
    check_ce_inputs(logits, labels, tau, mask)
    impl = resolve_backend(backend, logits.device, logits.dtype)
    if impl == "triton":
        loss, _, correct, collapsed, norm = _tempered_ce_op(logits, labels, tau, mask)
    else:
        loss, correct, collapsed, norm = _TorchCE.apply(logits, labels, tau, mask)
    return loss, CEStats(correct, collapsed, norm)


def loss_and_grad(logits, labels, tau, mask=None, backend: str = "auto", loss: str = "ce"):
    """Forward and backward in one call, no autograd: (loss (M,), dlogits (M, N, V), CEStats).

    The trainer's hand-written backward starts from `dlogits`. `loss="mse"` uses the reference always.
    """
    if loss == "mse":
        out = tempered_mse_reference(logits, labels, tau, mask)
    elif resolve_backend(backend, logits.device, logits.dtype) == "triton":
        out = _tempered_ce_op(logits, labels, tau, mask)
    else:
        out = tempered_ce_reference(logits, labels, tau, mask)
    return out[0], out[1], CEStats(*out[2:])


def loss_and_stats(logits, labels, tau, mask=None, backend: str = "auto", loss: str = "ce"):
    """`loss_and_grad` without the gradient, for evaluations: (loss (M,), CEStats). The Triton kernel then
    skips its gradient pass (no (M, N, V) buffer written); the reference computes and drops it (a compiled
    evaluation never materialises it)."""
    if loss != "mse" and resolve_backend(backend, logits.device, logits.dtype) == "triton":
        out = _tempered_ce_readouts_op(logits, labels, tau, mask)
        return out[0], CEStats(*out[1:])
    out = loss_and_grad(logits, labels, tau, mask, backend=backend, loss=loss)
    return out[0], out[2]


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
           "resolve_backend", "BackendError", "BACKENDS"]
