"""Weight snapshots (`--snapshots N`): each model's parameters at about N log-spaced steps and at its own
T_mem and T_grok, for post-hoc analyses (local learning coefficient, lottery tickets).

    DIR/snapshots/step_000123.npz   one file per snapshot step, the models snapshotted there (`np.load`):
        models   (K,) int64       their `model` ids (the run's models.parquet `model` column)
        reason   (K,) str         why each: "log", "t_mem", "t_grok", or several joined by "+" in that order
        flat     (K, P)           float32 or float64 (the run's dtype): each model's flat parameter row
        <name>   (K, ...)         each parameter by name (models.ParamLayout: E, W1, W2, b1, b2 for the MLP)
    DIR/snapshots/index.json        [{"step", "model", "reason", "file"}], rebuilt from the files

Which steps (`log_steps`): a model with step budget B takes step 0 and the points B ** (k / (N - 1)),
k = 1 .. N - 1, each moved to the nearest of its evaluation steps (the multiples of eval_every, and B; a
tie goes to the earlier), duplicates dropped: at most N steps, 0 and B among them. Besides these, the
evaluation step where its T_mem and its T_grok were detected. A model is snapshotted only while it
runs: not after it stopped (its T_grok, its divergence, its budget), so at most N + 2 files hold it.

Snapshots are taken at evaluations (the host sync the loop already has; the rows are copied to the host
only at a snapshot step). Files are written whole (store.atomic_write) with fixed zip timestamps, so the
same training gives byte-identical files: a run killed and resumed rewrites the steps after its
checkpoint as they were, and a run (or grid batch) that starts from step 0 first clears its directory.

Size (`bound_bytes`): at most (N + 2) snapshots x M models x (2 x P parameters x 4 (float32) or 8
(float64) bytes: the flat row and the named copy, + 512 x (4 + the number of named parameters) bytes:
the arrays' headers, the reason, the index row), printed before training; above `snapshot_cap_gib`
(2 GiB by default) the run is refused (ConfigError, one line).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from . import store
from .config import ConfigError, TrainConfig

INDEX = "index.json"
REASONS = ("log", "t_mem", "t_grok")


def log_steps(n: int, budget: int, eval_every: int) -> list[int]:
    """A model's log-spaced snapshot steps (see the module docstring): step 0, and for n >= 2 the points
    budget ** (k / (n - 1)), k = 1 .. n - 1, each at its nearest evaluation step (multiples of eval_every,
    and the budget; ties to the earlier), deduplicated and sorted."""
    if n < 1:
        return []
    out = {0}
    if n >= 2 and budget > 0:
        evals = np.unique(np.r_[np.arange(0, budget + 1, eval_every), budget])         # (E,) sorted
        for k in range(1, n):
            x = budget ** (k / (n - 1))
            i = int(np.searchsorted(evals, x))
            lo, hi = evals[max(i - 1, 0)], evals[min(i, len(evals) - 1)]
            out.add(int(lo if x - lo <= hi - x else hi))
    return sorted(out)


def bytes_per_param(cfg: TrainConfig) -> int:
    return 8 if cfg.dtype == "float64" else 4


def overhead_bytes(layout) -> int:
    """Per model and snapshot, a bound on what is not parameters: the headers of a file's arrays (~250
    bytes each, measured), its models and reason entries, its index.json row (~100 bytes)."""
    return 512 * (4 + len(layout.names))


def bound_bytes(cfg: TrainConfig, n_models: int, layout) -> int:
    """The most bytes a run's snapshots take (0 when off): (N + 2) x M x (2 x P x bytes per parameter +
    overhead_bytes); each parameter is stored twice (`flat` and by name)."""
    per = 2 * layout.n_params * bytes_per_param(cfg) + overhead_bytes(layout)
    return (cfg.snapshots + 2) * n_models * per if cfg.snapshots else 0


def describe(cfg: TrainConfig, n_models: int, layout) -> str:
    """The bound in words: `(20 + 2) x 4 models x (2 x 22,495 params x 4 bytes + 4,608) bytes = 8.0 MB`."""
    return (f"({cfg.snapshots} + 2) x {n_models:,} models x (2 x {layout.n_params:,} params x "
            f"{bytes_per_param(cfg)} + {overhead_bytes(layout):,}) bytes = {human(bound_bytes(cfg, n_models, layout))}")


def human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def check_bound(cfg: TrainConfig, total_bytes: int, what: str) -> None:
    """A one-line ConfigError when the snapshots could take more than cfg.snapshot_cap_gib."""
    cap = cfg.snapshot_cap_gib * 2**30
    if total_bytes > cap:
        raise ConfigError(f"snapshots: {what} is above the cap of {cfg.snapshot_cap_gib:g} GiB; take fewer "
                          f"(--snapshots, [train] snapshots) or raise the cap (--snapshot-cap-gib, "
                          f"[train] snapshot_cap_gib)")


def layout_of(cfg: TrainConfig):
    from .models import build_model
    return build_model(cfg).layout


def file_name(step: int) -> str:
    return f"step_{step:06d}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """numpy.savez's format (np.load opens it), with fixed timestamps so equal arrays give equal bytes."""
    def w(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for k, v in arrays.items():
                with z.open(zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
    store.atomic_write(path, w)


class Snapshots:
    """The snapshots of one trainer: its schedule per model and its directory."""

    def __init__(self, cfg: TrainConfig, directory: Path, layout, model_ids: list[int], budgets: np.ndarray):
        self.dir, self.layout = Path(directory), layout
        self.ids = np.asarray(model_ids, dtype=np.int64)                                  # (M,)
        self.sched = {int(b): set(log_steps(cfg.snapshots, int(b), cfg.eval_every)) for b in np.unique(budgets)}
        self.budgets = np.asarray(budgets)

    def clear(self) -> None:
        """A run starting from step 0: files of an earlier start (killed before its first checkpoint, or a
        grid batch trained again) go."""
        for f in self.dir.glob("step_*.npz"):
            f.unlink()
        (self.dir / INDEX).unlink(missing_ok=True)

    def due(self, step: int, running: np.ndarray, t_mem: np.ndarray, t_grok: np.ndarray) -> list[tuple[int, str]]:
        """(table row, reason) of the running models snapshotted at this evaluation step."""
        out = []
        for i in np.nonzero(running)[0]:
            why = [name for name, hit in zip(REASONS, (step in self.sched[int(self.budgets[i])],
                                                       t_mem[i] == step, t_grok[i] == step)) if hit]
            if why:
                out.append((int(i), "+".join(why)))
        return out

    def save(self, step: int, rows: list[tuple[int, str]], flat: np.ndarray) -> None:
        """Write step's file: rows (table row, reason) with their flat parameters (K, P), then the index."""
        import torch
        views = self.layout.views(torch.from_numpy(flat))
        arrays = {"models": self.ids[[i for i, _ in rows]], "reason": np.array([r for _, r in rows], dtype=str),
                  "flat": flat, **{k: v.numpy() for k, v in views.items()}}
        _write_npz(self.dir / file_name(step), arrays)
        write_index(self.dir)


def read_index_rows(directory: Path, prefix: str = "") -> list[dict]:
    """One row per (step, model) of the files in directory, from the files themselves."""
    rows = []
    for f in sorted(Path(directory).glob("step_*.npz")):
        try:
            with np.load(f) as z:
                models, reasons = z["models"], z["reason"]
        except FileNotFoundError:           # a grid batch starting afresh (clear) in another process
            continue
        step = int(f.stem.split("_")[1])
        rows += [{"step": step, "model": int(m), "reason": str(r), "file": prefix + f.name}
                 for m, r in zip(models, reasons)]
    return sorted(rows, key=lambda r: (r["step"], r["model"]))


def write_index(directory: Path) -> None:
    store.write_json(Path(directory) / INDEX, read_index_rows(directory))


def write_grid_index(root: Path) -> None:
    """A grid's DIR/snapshots/index.json: the snapshots of every batch directory so far (finished batches
    and those running; file: b000/step_...npz), written by the driver after each finished batch."""
    root = Path(root)
    if not root.is_dir():
        return
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        rows += read_index_rows(d, prefix=f"{d.name}/")
    store.write_json(root / INDEX, sorted(rows, key=lambda r: (r["step"], r["model"])))

