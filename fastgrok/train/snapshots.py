"""Weight snapshots (`--snapshots N`): each model's parameters at about N log-spaced steps and at its own
T_mem and T_grok, for post-hoc analyses (local learning coefficient, lottery tickets).

    DIR/snapshots/step_000123.npz   one file per snapshot step, the models snapshotted there (`np.load`):
        models   (K,) int64       their `model` ids (the run's models.parquet `model` column)
        reason   (K,) str         why each: "log", "t_mem", "t_grok", or several joined by "+" in that order
        flat     (K, P)           float32 or float64 (the run's dtype): each model's flat parameter row
        <name>   (K, ...)         each parameter by name (models.ParamLayout: E, W1, W2, b1, b2 for the MLP)
    DIR/snapshots/index.json        {"snapshots": [{"step", "model", "reason", "file"}]}, rebuilt after each
                                    file (`read_index`; before 2026-12-07 a bare list of those rows)

Which steps (`log_steps`): a model with step budget B takes step 0 and the points B ** (k / (N - 1)),
k = 1 .. N - 1, each moved to the nearest of its evaluation steps (the multiples of eval_every, and B; a
tie goes to the earlier), duplicates dropped: at most N steps, 0 and B among them. Besides these, the
evaluation step where its T_mem and its T_grok were detected. A model is snapshotted only while it
runs: not after it stopped (its T_grok, its divergence, its budget), so at most N + 2 files hold it.

Snapshots are taken at evaluations (the host sync the loop already has; the rows are copied to the host
only at a snapshot step). Files are written whole (store.atomic_write) with fixed zip timestamps, so the
same training gives byte-identical files: a run killed and resumed rewrites the steps after its
checkpoint as they were, and a run (or grid batch) that starts from step 0 first clears its directory.
Each file is sealed (store.read_verified checks it on every read), and a checkpoint records the sha256
of every snapshot file written before it: a resume refuses, in one line, a snapshot that has since been
deleted, damaged or replaced, and drops the files written after the checkpoint (it writes them again).

Size (`bound_bytes`): at most (N + 2) snapshots x M models x (2 x P parameters x 4 (float32) or 8
(float64) bytes: the flat row and the named copy, + 512 x (4 + the number of named parameters) bytes:
the arrays' headers, the reason, the index row), printed before training; above `snapshot_cap_gib`
(2 GiB by default) the run is refused (ConfigError, one line).
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from fastgrok import store
from fastgrok.config import ConfigError, TrainConfig

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
    from fastgrok.core.models import build_model
    return build_model(cfg).layout


def file_name(step: int) -> str:
    return f"step_{step:06d}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """numpy.savez's format (np.load opens it), with fixed timestamps so equal arrays give equal bytes,
    sealed (a zip comment); returns the file's sha256."""
    def w(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for k, v in arrays.items():
                with z.open(zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
            z.comment = store.ZIP_SEAL
    return store.atomic_write(path, w, seal=True)


def load(path: Path) -> dict[str, np.ndarray]:
    """A snapshot file's arrays (a StateError naming it if it is damaged or not a snapshot)."""
    return _arrays(path, store.read_verified(path))


def _arrays(path: Path, data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:                  # np.load's errors for a torn file vary (BadZipFile, EOFError, ...)
        raise store.state_error(path, f"not a readable snapshot, truncated or corrupt ({type(e).__name__})") from None


class Snapshots:
    """The snapshots of one trainer: its schedule per model and its directory."""

    def __init__(self, cfg: TrainConfig, directory: Path, layout, model_ids: list[int], budgets: np.ndarray):
        self.dir, self.layout = Path(directory), layout
        self.ids = np.asarray(model_ids, dtype=np.int64)                                  # (M,)
        self.sched = {int(b): set(log_steps(cfg.snapshots, int(b), cfg.eval_every)) for b in np.unique(budgets)}
        self.budgets = np.asarray(budgets)
        self.written: dict[str, str] = {}                   # file name -> sha256, saved in checkpoints
        self.rows: list[dict] = []                          # index.json's, kept here (no file re-read)

    def clear(self) -> None:
        """A run starting from step 0: files of an earlier start (killed before its first checkpoint, or a
        grid batch trained again) go."""
        for f in self.dir.glob("step_*.npz"):
            f.unlink()
        (self.dir / INDEX).unlink(missing_ok=True)
        self.written, self.rows = {}, []

    def restore(self, written: dict | None, checkpoint: Path, step: int) -> None:
        """After a checkpoint of `step` loads: each file it records must be there as written (a StateError
        naming the first that is not), and files written after it go (the run writes them again). A
        checkpoint written before snapshots were recorded (None) keeps the files as they are."""
        if written is None:
            self.rows = read_index_rows(self.dir)
            return
        rows = []
        for name, digest in sorted(written.items()):
            f = self.dir / name
            data = f.read_bytes() if f.is_file() else None
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                why = "missing" if data is None else "not the file written then (damaged or replaced)"
                raise store.StateError(f"{f}: {why}: a snapshot taken before the checkpoint of step {step:,}; put it "
                                       f"back, or move {checkpoint} away to train again from step 0 (which "
                                       "writes every snapshot again)")
            rows += _index_rows(f, _arrays(f, data))
        for f in self.dir.glob("step_*.npz"):
            if f.name not in written:
                f.unlink()
        self.written, self.rows = dict(written), rows
        self._write_index()

    def _write_index(self) -> None:
        store.write_json(self.dir / INDEX, {"snapshots": sorted(self.rows, key=lambda r: (r["step"], r["model"]))})

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
        name = file_name(step)
        self.written[name] = _write_npz(self.dir / name, arrays)
        self.rows += _index_rows(self.dir / name, arrays)
        self._write_index()


def read_index_rows(directory: Path, prefix: str = "") -> list[dict]:
    """One row per (step, model) of the files in directory, from the files themselves (each checked: a
    damaged one is a StateError naming it)."""
    rows = []
    for f in sorted(Path(directory).glob("step_*.npz")):
        try:
            z = load(f)
        except FileNotFoundError:           # a grid batch starting afresh (clear) in another process
            continue
        rows += _index_rows(f, z, prefix)
    return sorted(rows, key=lambda r: (r["step"], r["model"]))


def _index_rows(f: Path, z: dict, prefix: str = "") -> list[dict]:
    """index.json's rows of snapshot file f (its arrays z)."""
    if "models" not in z or "reason" not in z:
        raise store.state_error(f, "not a snapshot (no models or reason array)")
    step = int(f.stem.split("_")[1])
    return [{"step": step, "model": int(m), "reason": str(r), "file": prefix + f.name}
            for m, r in zip(z["models"], z["reason"])]


def read_index(directory: Path) -> list[dict]:
    """A snapshots directory's index.json rows (checked; an index written before 2026-12-07 is a bare list)."""
    index = store.read_json(Path(directory) / INDEX, kind=None)
    rows = index.get("snapshots") if isinstance(index, dict) else index
    if not isinstance(rows, list):
        raise store.state_error(Path(directory) / INDEX, "not a snapshot index")
    return rows


def write_grid_index(root: Path) -> None:
    """A grid's DIR/snapshots/index.json: the snapshots of every batch directory so far (finished batches
    and those running; file: b000/step_...npz), from their index files, written by the driver after each
    finished batch."""
    root = Path(root)
    if not root.is_dir():
        return
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / INDEX).exists():
            rows += [{**r, "file": f"{d.name}/{r['file']}"} for r in read_index(d)]
    store.write_json(root / INDEX, {"snapshots": sorted(rows, key=lambda r: (r["step"], r["model"]))})
