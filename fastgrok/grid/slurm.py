"""The SLURM executor, through submitit: a grid's jobs (grid/jobs.py) as one SLURM job array.

Each array task trains `batches_per_job` batches one after another (many models per task: sites cap array
sizes and submission rates) and leaves each finished batch's results as two sealed parquet files in one
directory (`DIR/slurm/results/<kind>-<id>-<hash>.{curves,models}.parquet`; the hash is the job's, so a
changed job, say after a larger `--max-steps`, never takes an old result). The driver alone writes the
run directory's parts (rundir.write_part) as those files appear, so each part has one writer; it looks
for them with one listing of that directory per poll, however many jobs it waits for. (Tasks of before
2026-12-08 left them beside the batch's checkpoint, `<job dir>/slurm-result-<hash>.*`: collected too.)

    DIR/slurm/jobs.json            which SLURM job holds which batch (the driver's record, sealed)
    DIR/slurm/results/             the results tasks left and the driver has not yet written as parts
    DIR/slurm/<job>_submitted.pkl  submitit's pickles: what each task runs, and its result; logs beside them
    DIR/slurm/locks/               one lock per batch, held by the task that trains it

The driver may exit at any time (Ctrl-C, kill -9, `--no-wait`): the jobs go on in SLURM, and the same
`fastgrok run` later collects the results that appeared, waits for the jobs still queued or running (from
the record and squeue) and submits the batches of no live job, which resume from their checkpoints. A
job submitted twice (the driver killed between sbatch and its record) waits on the batch's lock and
finds the work done. Preemption and time limits: SLURM signals USR2 (`--signal=USR2@90`) and the task
stops its trainer at the next step with a checkpoint, then submitit requeues it (its checkpointing); a
SIGTERM (scancel, preemption without that signal) checkpoints and ends the task. The driver reports a
job that ended without results (cancelled, failed) and ends with exit code 1; a rerun resubmits it.

Only submitit's own files in DIR/slurm/ are pickles (unpickled by submitit in the job); results go
through parquet. The run directory must be on storage that the cluster's nodes and the driver share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastgrok import store
from fastgrok.config import ConfigError
from fastgrok.grid import jobs as grid, rundir
from fastgrok.grid.experiments import SLURM_FIELDS, SlurmFields

FOLDER = "slurm"
RECORD = "jobs.json"
RESULTS = "results"
MAX_TIMEOUTS = 20
"""Requeues after a time limit per task (submitit's max_num_timeout): a task resumes where it stopped."""
LIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
        "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"}
"""squeue states of a job that may still write results (any other state, or none, has ended)."""


@dataclasses.dataclass(kw_only=True)
class SlurmOptions(SlurmFields):
    """How the jobs are submitted: [engine]'s fields overridden by the CLI's flags (`options`)."""
    wait: bool = True
    """False (`--no-wait`): submit, record and return; a later run collects."""
    poll_s: float = 5.0
    """Seconds between two squeue calls (results are looked for every second)."""
    minutes: int | None = None
    """The tasks' time limit as submitted (check() sets it: time_limit or the partition's; 0 = none)."""

    def __post_init__(self) -> None:
        self.check_slurm(lambda f: f"--{f.replace('_', '-')}")


def options(engine, **flags) -> SlurmOptions:
    """The spec's [engine] SLURM fields, each overridden by its flag when given."""
    unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(SlurmOptions)})
    if unknown:
        raise ConfigError(f"slurm: unknown option(s) {', '.join(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    return SlurmOptions(**{**{f: getattr(engine, f) for f in SLURM_FIELDS}, **given})


class Submitted(Exception):
    """`--no-wait`: the jobs are submitted (or still running) and the driver returns without results."""


class JobsFailed(RuntimeError):
    """SLURM jobs ended without their batches' results (cancelled, failed, killed)."""


# ---------------------------------------------------------------------------------------------
# Checks before anything is written: one line for each user mistake
# ---------------------------------------------------------------------------------------------
def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("the SLURM executor needs submitit: pip install 'fastgrok[slurm]'") from None
    return submitit


def _slurm(*argv: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError(f"the SLURM executor needs SLURM's commands: {argv[0]} is not on PATH (run on a "
                          "cluster's login node, or use --executor local)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"SLURM does not answer: {' '.join(argv[:2])} took over 60 s") from None


def _minutes(s: str) -> int | None:
    """A SLURM time limit ([days-]hours:minutes:seconds, minutes:seconds, minutes) in minutes; None:
    none (infinite, n/a)."""
    s = s.strip().lower()
    if s in ("infinite", "unlimited", "n/a", "none", ""):
        return None
    days, _, hms = s.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    h, m, sec = parts if len(parts) == 3 else (0, *parts) if len(parts) == 2 else (0, parts[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + (sec > 0)


def check(opts: SlurmOptions) -> SlurmOptions:
    """submitit, SLURM's commands and the partition are there; returns opts with the tasks' time limit in
    minutes (the option, else the partition's default, else its maximum; 0 = none)."""
    _submitit()
    out = _slurm("sinfo", "-h", "-o", "%P|%l|%L")
    if out.returncode != 0:
        raise ConfigError(f"SLURM does not answer (sinfo: {(out.stderr.strip() or 'failed').splitlines()[0]})")
    parts = {}
    for line in out.stdout.split():
        name, limit, default = line.split("|")
        parts[name.rstrip("*")] = (name.endswith("*"), _minutes(limit), _minutes(default))
    if opts.partition is not None and opts.partition not in parts:
        raise ConfigError(f"--partition: {opts.partition!r} is not a partition of this cluster "
                          f"({', '.join(sorted(parts)) or 'none'})")
    name = opts.partition or next((n for n, v in parts.items() if v[0]), None)
    _, limit, default = parts.get(name, (False, None, None))
    if opts.time_limit is not None:
        if limit is not None and opts.time_limit > limit:
            raise ConfigError(f"--time-limit: {opts.time_limit} min is over partition {name}'s limit of {limit} min")
        return dataclasses.replace(opts, minutes=opts.time_limit)
    return dataclasses.replace(opts, minutes=default or limit or 0)


# ---------------------------------------------------------------------------------------------
# In the job: train the task's batches, leave each one's results for the driver
# ---------------------------------------------------------------------------------------------
def _key(job: dict) -> str:
    return f"{job['kind']}-{job['id']}"


def _hash(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _result_paths(job: dict, run_dir: Path) -> tuple[Path, Path]:
    base = Path(run_dir) / FOLDER / RESULTS / f"{_key(job)}-{_hash(job)}"
    return Path(f"{base}.models.parquet"), Path(f"{base}.curves.parquet")


def _legacy_result_paths(job: dict) -> tuple[Path, Path]:
    """Where a task of before 2026-12-08 left a job's results: beside its checkpoint."""
    base = Path(job["dir"]) / f"slurm-result-{_hash(job)}"
    return Path(f"{base}.models.parquet"), Path(f"{base}.curves.parquet")


def _listed(run_dir: Path) -> set[str]:
    """The names in DIR/slurm/results/: a poll's one look at every job's results."""
    try:
        with os.scandir(Path(run_dir) / FOLDER / RESULTS) as entries:
            return {e.name for e in entries}
    except FileNotFoundError:
        return set()


def _staged(job: dict, run_dir: Path, listed: set[str] | None = None, paths: tuple[Path, Path] | None = None):
    """(models, curves) a task left for this job, or None. listed: the names `_listed` saw (a poll: no
    file looked up per job); None: look this job's files up, those of a task of before too. paths: the
    job's `_result_paths`, when the caller has them (a poll: no hash per job)."""
    models, curves = paths or _result_paths(job, run_dir)
    if listed is not None:
        if models.name not in listed:         # written last: its presence marks a whole result
            return None
    elif not models.exists():
        models, curves = _legacy_result_paths(job)
        if not models.exists():
            return None
    return store.read_parquet(models, run_dir=run_dir), store.read_parquet(curves, run_dir=run_dir)


def _collected(job: dict, run_dir: Path) -> bool:
    """Whether the driver already wrote this job's results (a part, a calibration)."""
    if job["kind"] == "batch":
        return job["id"] in rundir.done_batches(run_dir)
    return job["id"] in store.read_calibration(run_dir)


@contextlib.contextmanager
def _batch_lock(run_dir: Path, job: dict):
    """One task at a time trains a job (blocking): a task submitted twice waits, then finds it done."""
    d = run_dir / FOLDER / "locks"
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / f"{_key(job)}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SlurmTask:
    """What one array task runs (pickled by submitit): its jobs, in order. submitit calls `checkpoint`
    on a time limit or preemption (USR2) and requeues the task with what it returns: the same task,
    whose trainers resume from their checkpoints."""

    def __call__(self, run_dir: str, jobs: list[dict]) -> list[str]:
        from fastgrok.train import trainer as trainer_mod
        run_dir = Path(run_dir)
        n = os.environ.get("SLURM_CPUS_PER_TASK")
        if n and n.isdigit():
            import torch
            torch.set_num_threads(int(n))
        state = _StopSignals(trainer_mod)
        out = []
        for job in jobs:
            with _batch_lock(run_dir, job):
                if (_collected(job, run_dir) or _result_paths(job, run_dir)[0].exists()
                        or _legacy_result_paths(job)[0].exists()):
                    out.append(f"{_key(job)}: done before")
                    continue
                try:
                    models, curves = grid.run_job(job, progress=False)
                except trainer_mod.Interrupted as e:
                    print(f"fastgrok: {_key(job)}: {e} (checkpointed)", file=sys.stderr, flush=True)
                    state.requeue_if_asked()          # USR2: submitit checkpoints this task and requeues it
                    return out + [f"{_key(job)}: {e}"]
                fp = rundir.run_fingerprint(run_dir)
                m_path, c_path = _result_paths(job, run_dir)
                store.write_parquet(c_path, curves, fingerprint=fp)
                store.write_parquet(m_path, models, fingerprint=fp)       # last: marks the result whole
                out.append(f"{_key(job)}: done")
        return out

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(SlurmTask(), *args, **kwargs)


class _StopSignals:
    """A task's signals. SIGTERM (scancel, preemption): the running trainer checkpoints at its next step and
    stops; outside a trainer, the next one stops at once (trainer.PENDING_STOP). USR2 (SLURM's warning
    before a time limit or a preemption): the same stop, then submitit's own handler requeues."""

    def __init__(self, trainer_mod):
        self.trainer_mod, self.asked = trainer_mod, False
        self.submitit_usr2 = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR2, self._on_usr2)

    def _on_term(self, signum, frame) -> None:
        self.trainer_mod.PENDING_STOP = signum

    def _on_usr2(self, signum, frame) -> None:
        self.asked = True
        stop = signal.getsignal(signal.SIGTERM)       # a running trainer's handler, else _on_term
        if callable(stop):
            stop(signum, frame)

    def requeue_if_asked(self) -> None:
        if self.asked and callable(self.submitit_usr2):
            self.submitit_usr2(signal.SIGUSR2, None)   # calls SlurmTask.checkpoint, requeues, exits


# ---------------------------------------------------------------------------------------------
# The driver: submit what no live job holds, collect results as they appear
# ---------------------------------------------------------------------------------------------
class SlurmMapper:
    """Maps jobs to (models, curves) through SLURM (executors._run_plan's mapper); see the module doc."""

    def __init__(self, run_dir: Path, opts: SlurmOptions, spec_name: str):
        self.run_dir, self.opts = Path(run_dir), opts
        self.folder = self.run_dir / FOLDER
        self.job_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"fastgrok-{spec_name}")[:64]   # squeue -n splits at ","
        self.time_limit = opts.minutes if opts.minutes is not None else check(opts).minutes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    # -------------------------------------------------------------- the record and the queue
    def _record(self) -> dict:
        p = self.folder / RECORD
        return store.read_json(p)["jobs"] if p.exists() else {}

    def _write_record(self, record: dict) -> None:
        store.write_json(self.folder / RECORD, {"jobs": record})

    def _queue(self) -> dict[str, str] | None:
        """{job id: state} of this run's jobs SLURM still lists (array tasks one by one); None: squeue failed."""
        out = _slurm("squeue", "-h", "-r", "-t", "all", "-n", self.job_name, "-o", "%i|%T")
        if out.returncode != 0:
            return None
        return dict(line.split("|", 1) for line in out.stdout.split())

    # -------------------------------------------------------------- submission
    def _submit(self, jobs: list[dict], record: dict, bar) -> list[str]:
        submitit = _submitit()
        o = self.opts
        k = o.batches_per_job or 1
        groups = [jobs[i:i + k] for i in range(0, len(jobs), k)]
        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=MAX_TIMEOUTS)
        params = {"job_name": self.job_name, "time": self.time_limit, "partition": o.partition,
                  "cpus_per_task": o.cpus_per_job, "gpus_per_node": o.gpus_per_job or None,
                  "array_parallelism": o.array_parallelism}
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        try:
            handles = ex.map_array(SlurmTask(), [str(self.run_dir)] * len(groups), groups)
        except Exception as e:                 # sbatch's refusal (submitit's FailedJobError, CalledProcessError)
            why = next((ln for ln in str(e).splitlines() if "error" in ln.lower()), str(e).strip()[:300])
            raise ConfigError(f"sbatch refused the jobs: {why.strip()}") from None
        for h, g in zip(handles, groups):
            for job in g:
                record[_key(job)] = {"job": h.job_id, "hash": _hash(job)}
        self._write_record(record)
        ids = sorted({h.job_id.split("_")[0] for h in handles})
        bar.say(f"slurm: submitted {len(jobs)} {jobs[0]['kind']} job(s) as {len(groups)} array task(s) "
                f"(SLURM job {', '.join(ids)}, {self.job_name}; time limit "
                f"{f'{self.time_limit} min' if self.time_limit else 'none'}); logs: {self.folder}/")
        return [h.job_id for h in handles]

    # -------------------------------------------------------------- collect
    def _sweep(self, waiting: dict) -> None:
        """Drop the results of jobs whose part or calibration is already written (a driver killed between
        writing a part and dropping its result leaves them; before, they went with the batch's directory)."""
        mine = {p.name for job in waiting.values() for p in _result_paths(job, self.run_dir)}
        done, cal = None, None
        for name in _listed(self.run_dir) - mine:
            if name.startswith(".") or not name.endswith(".parquet"):
                continue                            # a file being written
            kind, _, rest = name.partition("-")
            job_id = rest.rsplit("-", 1)[0]
            if kind == "batch":
                done = rundir.done_batches(self.run_dir) if done is None else done
                gone = job_id in done
            else:
                cal = store.read_calibration(self.run_dir) if cal is None else cal
                gone = job_id in cal
            if gone:
                (self.run_dir / FOLDER / RESULTS / name).unlink(missing_ok=True)

    def __call__(self, jobs, progress, bar):
        if not jobs:
            return
        run_dir = self.run_dir
        waiting = {_key(j): j for j in jobs}
        queue = self._queue()
        if queue is None:
            raise ConfigError("SLURM does not answer (squeue failed); is its controller up?")
        for k, job in list(waiting.items()):          # results a task left while no driver was there
            got = _staged(job, run_dir)
            if got is not None:
                del waiting[k]
                yield job, got
                _unstage(job, run_dir)
        self._sweep(waiting)
        record = self._record()
        held = {k for k in waiting if record.get(k, {}).get("job") in queue
                and queue[record[k]["job"]] in LIVE}
        if held:
            bar.say(f"slurm: {len(held)} job(s) already queued or running in SLURM "
                    f"({_ids([record[k]['job'] for k in held])}); waiting for them")
        fresh = [j for k, j in waiting.items() if k not in held]
        if fresh:
            self._submit(fresh, record, bar)
        if not self.opts.wait:
            raise Submitted(f"{len(waiting)} job(s) in SLURM ({_ids([record[k]['job'] for k in waiting])}); "
                            f"rerun the same command to collect their results (and submit the next stage)")
        failed, last, shown = {}, 0.0, None
        try:
            paths = {k: _result_paths(job, run_dir) for k, job in waiting.items()}
            while waiting:
                listed = _listed(run_dir)               # one listing per poll, not a look-up per job
                for k, job in list(waiting.items()):
                    got = _staged(job, run_dir, listed, paths[k])
                    if got is not None:
                        del waiting[k]
                        yield job, got
                        _unstage(job, run_dir)
                if not waiting or time.monotonic() - last < self.opts.poll_s:
                    time.sleep(min(1.0, self.opts.poll_s) if waiting else 0)
                    continue
                last = time.monotonic()
                queue = self._queue()
                if queue is None:
                    continue                            # squeue failed this time: ask again later
                for k, job in list(waiting.items()):
                    jid = record[k]["job"]
                    if queue.get(jid) in LIVE:
                        continue
                    got = _staged(job, run_dir)         # it may have finished since the look above
                    if got is not None:
                        del waiting[k]
                        yield job, got
                        _unstage(job, run_dir)
                        continue
                    failed[k] = (jid, queue.get(jid, "ended"))
                    del waiting[k]
                states = [queue.get(record[k]["job"], "?") for k in waiting]
                now = (states.count("RUNNING"), states.count("PENDING"))
                if now != shown and waiting:
                    bar.note(f"slurm: {len(waiting)} job(s) left: {now[0]} running, {now[1]} pending"
                             + (f", {len(failed)} ended without results" if failed else ""))
                    shown = now
        except KeyboardInterrupt as e:
            ids = _ids([record[k]["job"] for k in waiting])
            raise KeyboardInterrupt(f"{e or 'interrupted'}; the SLURM jobs go on ({ids}; scancel stops them), "
                                    "and the same command collects them") from None
        if failed:
            raise JobsFailed(_failure_line(failed, self.folder))


def _unstage(job: dict, run_dir: Path) -> None:
    for p in (*_result_paths(job, run_dir), *_legacy_result_paths(job)):
        p.unlink(missing_ok=True)


def _ids(ids: list[str]) -> str:
    """SLURM job ids, an array's tasks as ranges: 12_[0-3,5], 14."""
    arrays: dict[str, list[int]] = {}
    plain = set()
    for j in ids:
        a, _, t = j.partition("_")
        arrays.setdefault(a, []).append(int(t)) if t.isdigit() else plain.add(j)
    out = []
    for a, ts in sorted(arrays.items()):
        runs: list[list[int]] = []
        for t in sorted(set(ts)):
            if runs and t == runs[-1][1] + 1:
                runs[-1][1] = t
            else:
                runs.append([t, t])
        out.append(f"{a}_[{','.join(str(x) if x == y else f'{x}-{y}' for x, y in runs)}]")
    return ", ".join(out + sorted(plain))


def _failure_line(failed: dict, folder: Path) -> str:
    first_id = next(iter(failed.values()))[0]
    log = folder / f"{first_id}_0_log.err"
    why = ""
    if log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines()      # the job's, not SLURM's
                 if ln.strip() and not ln.startswith((" ", "submitit", "srun", "slurmstepd"))]
        why = f"; its log's last line: {lines[-1][:200]!r}" if lines else ""
    jobs = ", ".join(f"{k} ({jid}, {state})" for k, (jid, state) in list(failed.items())[:6])
    more = f" and {len(failed) - 6} more" if len(failed) > 6 else ""
    return (f"{len(failed)} job(s) ended in SLURM without results: {jobs}{more}{why}; the same command "
            f"resubmits them, resuming from their checkpoints (logs: {log})")

