"""The torch.func ensemble (fastgrok.bench.ensemble_baseline) trains what fastgrok trains: the comparison of
`fastgrok bench --sections ensemble` is of equal work."""
from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastgrok.config import TrainConfig, quick_cpu
from fastgrok.bench.ensemble_baseline import EnsembleCell, build_module
from fastgrok.train.trainer import Trainer

TINY = {"mlp": dict(p=13, d_embed=16, hidden=32),
        "transformer": dict(model="transformer", p=13, d_model=32, d_mlp=64)}


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_a_member_is_a_plain_module_trained_by_torch_adamw(kind, one_thread):
    """Member s of the ensemble (torch.optim.AdamW's order: decay before the update) = one nn.Module with
    seed s's weights and split, trained by a plain loop with torch.optim.AdamW (decay on the matrices)."""
    cfg = TrainConfig(**TINY[kind], seeds=3, device="cpu", compile="off", wd=0.5)
    ens = EnsembleCell(cfg, compile=False, decay="before")
    s = 1
    model = build_module(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.copy_(ens.params[name][s])
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": mats, "weight_decay": cfg.wd}, {"params": vecs, "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for _ in range(8):
        loss = F.cross_entropy(model(ens.ta[s], ens.tb[s]) / cfg.taus[0], ens.ty[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(ens.step()[s], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, prm in model.named_parameters():
        torch.testing.assert_close(ens.params[name][s], prm.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_the_ensemble_follows_fastgrok(kind, one_thread):
    """With the study's AdamW (decay after the update) every member follows fastgrok's model of its seed to
    float rounding: loss, parameters and the evaluation's accuracies."""
    cfg = TrainConfig(**TINY[kind], seeds=3, device="cpu", compile="off")
    tr = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    ens = EnsembleCell(cfg, compile=False)
    for _ in range(6):
        torch.testing.assert_close(ens.step(), tr.step_fn(tr.state, tr.batch), rtol=1e-5, atol=1e-6)
    P = tr.model.layout.views(tr.state["flat"])
    for name, prm in ens.params.items():
        torch.testing.assert_close(prm, P[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ens.evaluate().double(), tr.eval_fn(tr.state, tr.batch)[:, 1:3])


def test_the_ensemble_learns_as_fastgrok_does(one_thread):
    """The quick preset's cell (p = 31, groks in a few hundred steps), 4 seeds, 600 steps: the ensemble's
    train and test accuracies, and its grokking steps, are fastgrok's within seed noise (measured: equal
    to 3 decimals at every evaluation; across seeds test accuracy spreads by ~0.1 at step 600)."""
    steps = 600
    cfg = replace(quick_cpu(), steps=steps, device="cpu", stop_when_grokked=False)
    tr = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    tr.run()
    evals, _ = EnsembleCell(cfg, compile=False).run(steps)
    assert [e[0] for e in evals] == tr.records.steps
    fg_train, fg_test = tr.records.evals[-1][:, 1], tr.records.evals[-1][:, 2]
    (_, train, test) = evals[-1]
    noise = statistics.stdev(fg_test.tolist())                          # seed-to-seed spread of fastgrok's
    assert noise > 0.01
    assert min(train) >= 0.99 and min(fg_train) >= 0.99                 # both memorised
    assert statistics.mean(test) > 0.5                                  # and generalise
    for ours, theirs in zip(test, fg_test.tolist()):
        assert abs(ours - theirs) < noise
    grok = [next((s for s, _, te in evals if te[m] >= cfg.grok_threshold), -1) for m in range(cfg.seeds)]
    for ours, theirs in zip(grok, tr.records.t_grok.tolist()):
        assert abs(ours - theirs) <= cfg.eval_every


def test_the_ensemble_refuses_what_it_does_not_train():
    with pytest.raises(ValueError, match="without a clamp"):
        EnsembleCell(TrainConfig(**TINY["mlp"], seeds=2, norm_targets=(5.0,)), compile=False)
    with pytest.raises(ValueError, match="one op"):
        EnsembleCell(TrainConfig(**TINY["mlp"], seeds=2, op=("add", "sub")), compile=False)


@pytest.mark.slow
def test_bench_ensemble_section_quick(tmp_path, capsys):
    """`fastgrok bench --quick --sections ensemble`: both models, the four ways on a CPU (the study's loop for
    the MLP only), every figure positive; the accuracies at the end agree (same weights, same splits)."""
    from fastgrok.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--sections", "ensemble", "--models", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["ensemble"]
    ways = {"fastgrok compiled", "fastgrok eager", "torch.func ensemble (compiled)"}
    assert {(r["model"], r["provider"]) for r in rows} == {
        *((kind, w) for kind in ("mlp", "transformer") for w in ways), ("mlp", "study eager per-cell loop")}
    for r in rows:
        for key in ("wall_s", "step_s", "eval_s", "model_steps_per_s", "projected_model_steps_per_s", "vs_ensemble"):
            assert r[key] > 0, (r["provider"], key)
        assert r["M"] == 2 and r["evals"] == 3                        # steps 0, 25, 30
    for kind in ("mlp", "transformer"):
        accs = {(round(r["train_acc"], 4), round(r["test_acc"], 4)) for r in rows if r["model"] == kind}
        assert len(accs) == 1, accs
    assert "torch.func" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_ensemble_runs_only_the_providers_asked(one_thread):
    """section_ensemble(providers=...): only those ways run, each its full run of steps; fastgrok compiled
    and the ensemble, whose ratios the section reports, cannot be left out."""
    from fastgrok.bench.ensemble import EAGER, ENSEMBLE, FASTGROK, STUDY, section_ensemble
    rows = section_ensemble(torch.device("cpu"), quick=True, models=(1,), steps={"mlp": 3}, kinds=("mlp",),
                            providers=(FASTGROK, STUDY, ENSEMBLE))
    assert [r["provider"] for r in rows] == [FASTGROK, STUDY, ENSEMBLE]
    assert all(r["steps"] == 3 and r["evals"] == 2 and r["wall_s"] > 0 for r in rows)
    assert EAGER not in {r["provider"] for r in rows}
    assert rows[0]["vs_ensemble"] > 0 and rows[0]["vs_study"] > 0
    with pytest.raises(ValueError, match="must|subset"):
        section_ensemble(torch.device("cpu"), quick=True, models=(1,), providers=(FASTGROK, STUDY))
