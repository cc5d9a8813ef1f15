"""A single-node SLURM cluster for the tests: munged, slurmctld and slurmd started as this user (root on
CI) with every file under one temporary directory (its own munge key and socket, free ports), stopped by
their PIDs. Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> str | None:
    """None when a cluster can start here; else why not."""
    missing = [d for d in (*DAEMONS, "sbatch", "squeue") if shutil.which(d) is None and
               not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a test SLURM cluster runs its daemons as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """start() -> env (SLURM_CONF set) for the clients; stop() ends the daemons it started by PID."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus, self.pids = Path(root), cpus, {}
        self.host = socket.gethostname()

    def start(self, timeout_s: float = 60.0) -> dict:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        ctld_port, d_port = _free_ports(2)
        self.conf = r / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=fastgrok-test", f"SlurmctldHost={self.host}", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={sock},cred_expire=5", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=sched_interval=2", "KillWait=30", "MinJobAge=300",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory=20000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._spawn("munged", [_exe("munged"), "--force", "--foreground", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}"])
        self._wait(lambda: sock.exists(), timeout_s, "munged's socket")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_exe("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._idle, timeout_s, "an idle node (sinfo)")
        return self.env

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.pids[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        t0 = time.monotonic()
        while not ready():
            dead = [n for n, p in self.pids.items() if p.poll() is not None]
            if dead or time.monotonic() - t0 > timeout_s:
                self.stop()
                logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                                 for f in sorted((self.root / "log").iterdir()))
                raise RuntimeError(f"test SLURM cluster: no {what} ({'exited: ' + ', '.join(dead) if dead else 'timeout'})"
                                   f"\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job still queued or running (a failed test leaves them; their job steps outlive
        the daemons otherwise), then SIGTERM each daemon by its PID (slurmd, slurmctld, munged) and
        SIGKILL what is left."""
        if self.pids.get("slurmctld") is not None and self.pids["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--signal=KILL", "--user", "root"], env=self.env,
                           capture_output=True, timeout=30)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15:
                q = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self.pids.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.pids = {}
