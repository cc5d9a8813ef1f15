"""Rules of the house (issue 28): what is declared once stays consistent with what it describes."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import sys
from pathlib import Path

import fastgrok
import fastgrok.kernels
from fastgrok import analysis
import pytest

from fastgrok.cli import main
from fastgrok.config import ConfigError
from fastgrok.train.status import train_status


def test_every_module_is_a_lazy_attribute_of_the_package():
    """fastgrok.<name> loads each module of the package (the list is found on disk, not written out)."""
    names = {m.name for m in pkgutil.iter_modules(fastgrok.__path__) if not m.name.startswith("_")}
    assert names and names | {"kernels"} == set(fastgrok._SUBMODULES)
    for name in sorted(names):
        assert getattr(fastgrok, name) is importlib.import_module(f"fastgrok.{name}")


def test_status_counts_the_cells_of_every_per_model_axis(tmp_path):
    """Two lrs x two taus are 4 cells (status used to count taus x clamp targets only: 2)."""
    out = tmp_path / "run"
    assert main(["train", "--p", "11", "--seeds", "2", "--d-embed", "8", "--hidden", "8", "--steps", "10",
                 "--lr", "1e-3", "3e-3", "--tau", "1", "2", "--no-compile", "--quiet", "--out", str(out)]) == 0
    assert "8 models (4 cells x 2 seeds)" in train_status(out)[0]


def test_the_analysis_side_loads_no_torch():
    """Reading and analysing results (store, status, analysis, report and their helpers) imports no torch:
    a notebook or a login node without torch can read a run directory."""
    import subprocess
    import sys
    mods = ["store", "train.status", *(f"analysis.{m.name}" for m in pkgutil.iter_modules(analysis.__path__))]
    code = ("import sys\n" + "".join(f"import fastgrok.{m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# Imports point one way: kernels <- config <- store <- core <- train <- grid | bench; analysis stands on
# config and store only; cli, export and the package's own files are the top and may import anything.
# ---------------------------------------------------------------------------------------------------------
LAYERS = {"kernels": 0, "config": 1, "store": 2, "core": 3, "train": 4, "grid": 5, "bench": 5}
ANALYSIS_MAY_IMPORT = {"config", "store", "analysis"}
TOP = {"cli", "export", "__init__", "__main__"}


def _unit(dotted: str) -> str:
    """fastgrok.train.trainer -> train; fastgrok.store -> store; fastgrok.kernels.reference -> kernels."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _fastgrok_imports(path: Path, module: str) -> set[str]:
    """Every fastgrok module `path` imports, at the top or inside a function (relative ones resolved)."""
    out = set()
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fastgrok"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "fastgrok":
                out |= {f"{base}.{a.name}" for a in node.names}
            elif base.split(".")[0] == "fastgrok":
                out.add(base)
    return out


def _modules():
    root = Path(fastgrok.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        yield path, ".".join(("fastgrok", *rel.parts)).removesuffix(".__init__")
    kroot = Path(fastgrok.kernels.__file__).parent
    for path in sorted(kroot.glob("*.py")):
        yield path, "fastgrok.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")


def _bad_imports() -> list[str]:
    bad = []
    for path, module in _modules():
        unit = _unit(module) if module != "fastgrok" else "__init__"
        if unit in TOP:
            continue
        for target in _fastgrok_imports(path, module):
            t = _unit(target)
            if t == unit or t.startswith("_"):     # the package root's own helpers: below every layer
                continue
            if unit == "analysis":
                ok = t in ANALYSIS_MAY_IMPORT
            else:
                ok = t in LAYERS and LAYERS[t] < LAYERS[unit]
            if not ok:
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def test_imports_point_one_way():
    """No module imports upward (core -> train) or sideways (grid <-> bench, analysis -> training code)."""
    assert _bad_imports() == []


def test_the_import_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker sees imports inside functions and relative ones: a core module importing the trainer
    (the kind of leak the rule exists for) is reported."""
    path = tmp_path / "leak.py"
    path.write_text("def f():\n    from ..train import trainer\n    import fastgrok.grid.plan\n")
    assert _fastgrok_imports(path, "fastgrok.core.leak") == {"fastgrok.train", "fastgrok.grid.plan"}
    real = list(_modules())
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: [*real, (path, "fastgrok.core.leak")])
    assert _bad_imports() == ["fastgrok.core.leak imports fastgrok.grid.plan",
                              "fastgrok.core.leak imports fastgrok.train"]


# ---------------------------------------------------------------------------------------------------------
# One declaration per concept: a per-model setting is a TrainConfig field made with config.per_model(...);
# its CLI flag, spec axis, packing, result column and calibration key derive from it.
# ---------------------------------------------------------------------------------------------------------
def test_every_per_model_setting_derives_from_its_declaration(tmp_path):
    from fastgrok.analysis.statistics import SETTING_COLS
    from fastgrok.cli import _TRAIN_FLAGS
    from fastgrok.config import ADDED_DEFAULTS, AXIS_ADDED_DEFAULTS, GRID_AXES, PER_MODEL, PER_MODEL_META, TrainConfig
    from fastgrok.grid.experiments import AXES, PACKED_AXES, Axes
    from fastgrok.grid.plan import CALIB_AXES
    declared = [f.name for f in dataclasses.fields(TrainConfig) if "per_model" in f.metadata]
    assert list(PER_MODEL) == declared == list(PER_MODEL_META) and len(declared) >= 9
    assert ADDED_DEFAULTS == {n: getattr(TrainConfig(), n) for n in declared if PER_MODEL_META[n].added}
    assert AXIS_ADDED_DEFAULTS == {n: getattr(TrainConfig(), n) for n in declared if PER_MODEL_META[n].axis_added}
    assert ADDED_DEFAULTS.items() <= AXIS_ADDED_DEFAULTS.items()
    flags = {field: flag for flag, (field, _) in _TRAIN_FLAGS.items()}
    axes_fields = {f.name for f in dataclasses.fields(Axes)}
    for name in declared:
        assert flags[name] == "--" + name.replace("_", "-")
        assert GRID_AXES.count(name) == AXES.count(name) == PACKED_AXES.count(name) == 1, name
        assert name in axes_fields and name in CALIB_AXES and name in SETTING_COLS
    # a bad value is refused by the rule of the declaration, in a config, a spec and on the command line
    for name in declared:
        bad = "x" if not PER_MODEL_META[name].choices else "nonsense"
        with pytest.raises(ConfigError, match=name):
            TrainConfig(**{name: bad})
        with pytest.raises(ConfigError, match=name):
            Axes.from_dict({name: [bad]}, "spec")
    # and every per-model setting is a column of the models table
    out = tmp_path / "run"
    assert main(["train", "--p", "11", "--seeds", "1", "--d-embed", "8", "--hidden", "8", "--steps", "2",
                 "--no-compile", "--quiet", "--out", str(out)]) == 0
    import pandas as pd
    assert set(declared) <= set(pd.read_parquet(out / "models.parquet").columns)


def _literal_lists_of_per_model_names() -> list[str]:
    """Literal tuples, lists, sets and dict keys outside config.py that name at least two thirds of the
    per-model settings: a second declaration, which a new setting would be missing from."""
    from fastgrok.config import PER_MODEL
    names, out = set(PER_MODEL), []
    for path, module in _modules():
        if module == "fastgrok.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else
                    [k for k in node.keys if k is not None] if isinstance(node, ast.Dict) else [])
            hit = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
            if 3 * len(hit) >= 2 * len(names):
                out.append(f"{module}:{node.lineno}")
    return out


def test_no_second_list_of_the_per_model_settings():
    assert _literal_lists_of_per_model_names() == []


def test_losses_and_tasks_are_declared_once():
    """The loss names (config.LOSSES) are the kernels' codes' names (kernels.LOSS_KINDS, the one table of
    codes); the tasks are config.OP_HELP's keys and each has its table in data.py."""
    from fastgrok.config import LOSSES, OP_HELP, OPS
    from fastgrok.core.data import op_table
    assert set(LOSSES) == set(fastgrok.kernels.LOSS_KINDS)
    assert OPS == tuple(OP_HELP)
    for op in OPS:
        p = {"perm": 6, "div": 7}.get(op, 7)
        assert op_table(p, op).shape == (p, p)
