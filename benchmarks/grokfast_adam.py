"""Why Grokfast-EMA does not shorten T_grok under full-batch AdamW here: what it does to Adam's step.

    python benchmarks/grokfast_adam.py                 # the interventions experiment's Grokfast arm (wd 1)
    python benchmarks/grokfast_adam.py --wd 0.1 --steps 6000

Lee et al. 2024 amplify the slow component of the gradient, g^ = g + lambda h (h an EMA of g). Under SGD
that scales the step along slow directions by up to 1 + lambda. Adam divides each coordinate's first
moment by the root of its second moment, so a gradient scaled by a constant gives the same step; with
full-batch gradients that change slowly, h stays close to g and g^ is close to (1 + lambda) g.

This trains the Grokfast arm (eager, stop_when_grokked off so the batch keeps its models) and, at every
step, feeds the raw g into a shadow Adam (optim.adamw: same betas and eps, same trajectory) beside a second
one fed g^, as the real one is. Per model and step it records cos(g, g^) and, of the two bias-corrected
Adam steps u (from g) and u^ (from g^), cos(u^, u) and ||u^|| / ||u||. Printed: each measure's
median and 5th percentile over all steps and over the 100 steps before each model's T_grok.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import fastgrok.core.step as step
from fastgrok.config import TrainConfig
from fastgrok.core.optim import adamw, grokfast_ema
from fastgrok.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=31)
    ap.add_argument("--wd", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.98)
    ap.add_argument("--lamb", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    cfg = TrainConfig(p=args.p, d_embed=64, hidden=128, train_frac=0.6, lr=args.lr, wd=args.wd,
                      grokfast_alpha=args.alpha, grokfast_lambda=args.lamb, seeds=args.seeds,
                      steps=args.steps, compile="off", stop_when_grokked=False)
    shadow: dict[str, torch.Tensor] = {}
    rows: list[np.ndarray] = []                      # per step: (M, 4) cos(g, g^), cos(u^, u), ratio, t

    def adam_step(g, key, t):
        """Adam's step for gradient g from the shadow moments `key` (optim.adamw from zero weights, lr -1)."""
        m, v = shadow.get(key + "m", torch.zeros_like(g)), shadow.get(key + "v", torch.zeros_like(g))
        u, shadow[key + "m"], shadow[key + "v"] = adamw(torch.zeros_like(g), g, m, v, t + 1, lr=-1.0,
                                                        beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                                                        lr_wd=None, n_mat=0)
        return u

    def recording(grad, h, t, alpha, lamb):
        new_g, new_h = grokfast_ema(grad, h, t, alpha, lamb)
        g, gh = grad.double(), new_g.double()
        u, uh = adam_step(g, "raw", t), adam_step(gh, "grokfast", t)
        cos = torch.nn.functional.cosine_similarity
        rows.append(torch.stack([cos(g, gh, dim=1), cos(uh, u, dim=1),
                                 uh.norm(dim=1) / u.norm(dim=1), t.double()], 1).numpy())
        return new_g, new_h

    step.grokfast_ema = recording
    with tempfile.TemporaryDirectory() as d:
        models = train(cfg, d, progress=False)
    rec = np.stack(rows)                              # (steps, M, 4)
    print(f"Grokfast-EMA alpha {args.alpha}, lambda {args.lamb}; p {args.p}, lr {args.lr}, wd {args.wd}, "
          f"{args.seeds} seeds, {args.steps} steps (eager, full batch)")
    print("T_grok per model:", models["t_grok"].tolist())
    names = ("cos(g, g^)", "cos(u^, u)", "||u^||/||u||")
    for label, sel in (("all steps", lambda t, tg: np.ones_like(t, bool)),
                       ("100 steps before T_grok", lambda t, tg: (t >= tg - 100) & (t < tg))):
        parts = []
        for i, name in enumerate(names):
            vals = np.concatenate([rec[:, m, i][sel(rec[:, m, 3], tg)] for m, tg in
                                   enumerate(models["t_grok"].astype("float64").fillna(np.inf).tolist())])
            if len(vals):
                parts.append(f"{name} median {np.median(vals):.4f}, 5th pct {np.percentile(vals, 5):.4f}")
        print(f"  {label}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
