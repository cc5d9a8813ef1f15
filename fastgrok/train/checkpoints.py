"""A batch's checkpoint: what it holds (tensors and plain types only: store.load_checkpoint loads it with
weights_only), the fingerprint that ties it to its run, the check a resume makes, and the records of
older checkpoints brought up to today's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastgrok import store
from fastgrok.config import PER_MODEL, TrainConfig, without_defaults
from fastgrok.train.state import Records


def payload(step: int, tensors: dict, records: Records, n_metrics: int, done: bool, capture_shares: bool,
            rows: np.ndarray, fingerprint: str, snapshots_written) -> dict:
    """The checkpoint of a batch at `step`: its tensors on the host, its records, whether it is done, the
    table rows its (possibly compacted) state holds, its fingerprint, and its snapshots' digests."""
    return {"step": step, "state": {k: v.detach().cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)},
            "records": records.to_payload(n_metrics), "done": done, "capture_shares": capture_shares,
            "rows": torch.as_tensor(rows), "fingerprint": fingerprint, "snapshots": snapshots_written}


def batch_fingerprint(cfg: TrainConfig, table: list[dict]) -> str:
    """sha256 of what determines a batch's results: the config and the models' table, less what only
    says how or how long it runs (device, kernels, compile, checkpoint interval; the step budgets, which a
    run may extend)."""
    c = {k: v for k, v in without_defaults(cfg.to_dict()).items() if k not in store.HOW_FIELDS}
    # a row's per-model value equal to the config's one value is left out, as rows were written before
    # these fields were per model (a checkpoint of then still resumes)
    same = {k: v for k, v in cfg.to_dict().items() if k in PER_MODEL and not isinstance(v, tuple)}
    rows = [{k: v for k, v in r.items() if k != "budget" and not (k in same and v == same[k])} for r in table]
    return store.fingerprint({"config": c, "table": rows})


def rows_of(ck: dict, M: int) -> np.ndarray:
    """The table rows a checkpoint's state holds (all M when it predates compaction)."""
    return np.asarray(ck["rows"]) if ck.get("rows") is not None else np.arange(M)


def check(ck: dict, path: Path, fingerprint: str, M: int, P: int) -> None:
    """A StateError naming the checkpoint unless it belongs to this run: its fingerprint, or (a checkpoint
    written before fingerprints) its tensors' and records' shapes (M models of P parameters)."""
    fp = ck.get("fingerprint")
    if fp is not None and fp != fingerprint:
        raise store.state_error(path, "its configuration fingerprint is not this run's (a checkpoint of "
                                      "another run, or the run's config.json or spec was edited)")
    rows = rows_of(ck, M)
    try:
        flat, rec = ck["state"]["flat"], ck["records"]
        ok = (tuple(flat.shape) == (len(rows), P) and len(rec["t_grok"]) == M and len(rec["t_mem"]) == M
              and len(rec["steps"]) == len(rec["evals"]) and (len(rows) == 0 or int(rows.max()) < M))
    except (KeyError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise store.state_error(path, f"a checkpoint of another run (its tensors are not those of {M} "
                                      f"model(s) of {P} parameters)")


def upgrade_records(records: Records, M: int, n_metrics: int) -> None:
    """Records of an older checkpoint as today's: no per-model stops yet (before per-model stopping), and
    NaN for the metrics added since (before test_loss, 6 metrics, or the measures)."""
    if records.stop is None:
        records.stop = np.full(M, -1)
    records.evals = [e if e.shape[1] == n_metrics else
                     np.concatenate([e, np.full((e.shape[0], n_metrics - e.shape[1]), np.nan)], 1)
                     for e in records.evals]
