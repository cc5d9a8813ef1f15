"""`fastgrok bench --quick` on the CPU: every section present, every figure positive and finite.

No timing assertions (the machines are shared); the run compiles a tiny MLP a few times (~1-2 min).
"""
from __future__ import annotations

import json
import math

import pytest

from fastgrok.cli import main

POSITIVE = {
    "ce": ("median_s", "min_s", "max_s", "p20_s", "p80_s", "bytes", "gb_per_s", "frac_copy_bw"),
    "clamp": ("median_s", "min_s", "max_s", "bytes", "gb_per_s", "frac_copy_bw"),
    "step": ("median_s", "min_s", "max_s", "seed_steps_per_s", "speedup_vs_baseline", "flops_per_step",
             "flop_per_s", "nominal_flop_per_s", "eval_per_step_s", "runs_per_hour", "run_speedup_vs_baseline"),
    "grid": ("wall_s", "first_calls_s", "runs_per_hour", "seed_runs_per_hour"),
    "phase": ("median_s", "min_s", "max_s", "model_steps_per_s", "speedup_vs_per_cell"),
}
PROVIDERS = {
    "ce": {"fastgrok.kernels (torch)", "eager reference", "torch.compile(reference)"},
    "clamp": {"fastgrok.kernels (torch)", "eager per-tensor"},
    "step": {"eager per-cell baseline", "fastgrok compiled", "fastgrok eager"},
    "grid": {"packed (one Trainer)", "sequential (one Trainer per cell)"},
    "phase": {"packed (one batch)", "one batch per (lr, wd) cell"},
}


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quick_cpu_writes_every_section(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True
    for key in ("device_name", "torch", "date"):
        assert meta[key]
    assert _positive_finite(res["copy_gb_per_s"])
    for section, fields in POSITIVE.items():
        rows = res[section]
        assert {r["provider"] for r in rows} == PROVIDERS[section], section
        for r in rows:
            for f in fields:
                assert _positive_finite(r[f]), (section, r["provider"], f, r[f])
            assert r.get("compile_s", 0.0) >= 0.0 or section == "ce"
    compiled = [r for r in res["step"] if r["provider"] == "fastgrok compiled"]
    assert compiled and all(_positive_finite(r["compile_s"]) for r in compiled)
    assert all(r["frac_fp32_peak"] is None for r in res["step"])         # no peak for a CPU
    assert {r["M"] for r in res["step"]} == {1, 4}
    # each provider at its own best M: the largest seed-steps/s over the Ms, and the ratio of those
    best = res["step_best"]
    for provider, b in best["providers"].items():
        top = max((r for r in res["step"] if r["provider"] == provider), key=lambda r: r["seed_steps_per_s"])
        assert (b["M"], b["seed_steps_per_s"]) == (top["M"], top["seed_steps_per_s"])
    assert best["speedup_best_vs_best"] == pytest.approx(best["providers"]["fastgrok compiled"]["seed_steps_per_s"]
                                                         / best["providers"]["eager per-cell baseline"]["seed_steps_per_s"])
    for r in res["grid"]:                                   # cell-runs and model-runs per hour agree
        assert r["seed_runs_per_hour"] == pytest.approx(r["runs_per_hour"] * r["seeds"])
    packed, per_cell = sorted(res["phase"], key=lambda r: r["provider"] != "packed (one batch)")
    assert packed["M"] == per_cell["M"] == len(packed["lrs"]) * len(packed["wds"]) == packed["cells"]
    assert packed["speedup_vs_per_cell"] == pytest.approx(per_cell["median_s"] / packed["median_s"])
    assert per_cell["speedup_vs_per_cell"] == 1.0
    assert png.stat().st_size > 0
    text = capsys.readouterr().out
    assert "fastgrok bench" in text and "at each provider's best M" in text


def test_step_flop_counts_by_hand():
    """The study's MLP at p = 59 (d 128, H 256, 1,392 train pairs): the direct form's 3 products per layer
    and the table form's, counted by hand (2 FLOPs per multiply-add)."""
    from fastgrok.bench.sections import mlp_table_flops
    from fastgrok.core.models import step_flops
    from fastgrok.config import TrainConfig
    cfg = TrainConfig(p=59)
    assert cfg.n_train == 1392
    assert step_flops(cfg) == 2 * (3 * 1392 * 256 * 256 + 3 * 1392 * 256 * 59)          # 673.5 M
    assert mlp_table_flops(cfg) == 2 * (3 * 1392 * 256 * 59 + 6 * 59 * 128 * 256)      # 149.4 M


def test_bench_sections_runs_only_those(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--sections", "clamp", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["clamp"] and not res["ce"] and not res["step"] and not res["grid"]
    assert all(_positive_finite(r["gb_per_s"]) for r in res["clamp"])


def test_bench_unknown_section_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "--quick", "--sections", "clamp,steps", "--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgrok: error: sections must be among") and err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


def test_step_section_stops_at_the_first_m_that_does_not_fit(monkeypatch, capsys):
    """A model count the trainer refuses as too big for the device (trainer.check_fits) ends the step
    section with a message, keeping the rows measured so far (a GPU's OOM is handled alike)."""
    import torch

    from fastgrok.bench import sections as bench
    from fastgrok.train import memory
    cfg = bench.step_config(quick=True)
    one = memory.estimate_bytes(cfg, 1, torch.device("cpu"))
    monkeypatch.setattr(memory, "device_memory", lambda device: one + 1)    # room for M = 1, not 4
    rows = bench.section_step(torch.device("cpu"), quick=True)
    assert {r["M"] for r in rows} == {1}
    assert "step at M = 4 does not fit" in capsys.readouterr().out
    # in any order (a GPU session measures its large M first): only M at or above the refused one is skipped
    rows = bench.section_step(torch.device("cpu"), quick=True, models=(4, 6, 1))
    assert {r["M"] for r in rows} == {1}


def test_a_failing_section_is_reported_and_the_next_runs(tmp_path, monkeypatch, capsys):
    """One section raising (say a compile failure on a new torch) costs that section only: the others
    run and are written, the JSON names the failure, the exit code is 1."""
    from fastgrok.bench import sections as bench

    def broken(*a, **kw):
        raise RuntimeError("inductor could not compile the reference")
    monkeypatch.setattr(bench, "section_ce", broken)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--sections", "ce,clamp", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["ce"] == [] and "could not compile" in res["errors"]["ce"]
    assert res["clamp"] and all(_positive_finite(r["gb_per_s"]) for r in res["clamp"])
    assert "the ce section failed" in capsys.readouterr().err


def test_models_option_reaches_the_step_section(tmp_path, monkeypatch, capsys):
    from fastgrok.bench import sections as bench
    seen = {}

    def fake_step(device, quick, on_rows=None, models=None):
        seen["models"] = models
        return []
    monkeypatch.setattr(bench, "section_step", fake_step)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--sections", "step", "--models", "12,768",
                 "--json", str(out)]) == 0
    assert seen["models"] == (12, 768)
    capsys.readouterr()
    for bad in ("0,12", "twelve"):
        assert main(["bench", "--sections", "step", "--models", bad, "--json", str(tmp_path / "b.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastgrok: error: --models must be") and err.count("\n") == 1
