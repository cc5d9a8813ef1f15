"""`fastgrok status` of a `fastgrok train` run directory: where the run is, read from its progress.json
(rewritten seconds apart while it trains, see trainer.PROGRESS_EVERY_S) and config.json, with no lock."""
from __future__ import annotations

from pathlib import Path

from fastgrok import store
from fastgrok.config import ConfigError


def train_status(run_dir: Path) -> list[str]:
    """Lines: the run's setup; step reached of the budget and its state; models memorized, grokked,
    diverged; the step a resume would start from."""
    run_dir = Path(run_dir)
    try:     # a bad file is one line naming it (store.StateError); an unreadable one names the directory
        config = store.read_config(run_dir / store.CONFIG)            # checked: its values format below
        cfg = config.to_dict()
        pr = store.read_progress(run_dir / store.PROGRESS) if (run_dir / store.PROGRESS).exists() else {}
        store.check_identity(run_dir / store.PROGRESS, pr.get("run"), run_dir)
    except store.StateError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"dir: {run_dir}: unreadable run state ({e}); is it a fastgrok run directory?") from None
    n_cells = len(config.cells)                     # every per-model axis's values, not only taus x targets
    models = pr.get("models", n_cells * cfg.get("seeds", 0))
    holder = store.lock_holder(run_dir)
    if pr.get("done"):
        state = "done"
    elif holder is not None:
        state = f"running (PID {holder})"
    else:
        state = f"stopped; continue it: fastgrok train --resume {run_dir}"
    lines = [f"{run_dir}: fastgrok train run, p={cfg.get('p')} {cfg.get('op')} {cfg.get('model')} {cfg.get('loss')} "
             f"{cfg.get('dtype')}, {models} models ({n_cells} cells x {cfg.get('seeds')} seeds)",
             f"step {pr.get('step', 0):,} of {pr.get('steps', cfg.get('steps', 0)):,}: {state}"]
    if "grokked" in pr:
        lines.append(f"memorized {pr['memorized']}/{models}, grokked {pr['grokked']}/{models}, "
                     f"diverged {pr['diverged']}")
    if not pr.get("done"):
        ck = pr.get("checkpoint")
        lines.append(f"last checkpoint: step {ck:,}" if ck else "no checkpoint yet (a resume starts at step 0)")
    return lines

