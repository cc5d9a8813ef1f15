"""How much memory a run needs, and the check that refuses one that cannot fit, before anything is written.

`estimate_bytes(cfg, M)` is an upper bound of the peak a run of M models adds to a process that has
imported torch and fastgrok: measured on a CPU (resident set, `benchmarks/memory_peak.py`, table in
benchmarks/RESULTS.md) for the step, the evaluation and compilation, both models, across p and M, and
tested (`tests/test_memory.py`). Its terms, per model, in elements of the working dtype:

    parameters: flat, m, v, the gradient and the AdamW step's new flat, m, v      PARAM_COPIES * P
    the evaluation over all N = p^2 pairs, or the step over the train rows (the larger; autograd keeps
    the transformer's activations for its backward):
        MLP          (M, N, H) pre-activations, GeLU, gathers; (M, N, V) logits, softmax, grad
        transformer  (M, N, 3, D) residual, q/k/v, attention out; (M, N, Nh, 3, 3) scores;
                     (M, N, 3, d_mlp) MLP in/out; (M, N, V) logits; in one layer (block 0 from tables,
                     the rest at the last position only, issue 31) (M, N, 3, D) values and their mix,
                     (M, N, 3, Nh) scores, (M, N, D) residual and attention out, (M, N, d_mlp) MLP in/out
    and, with the MLP's opt-in restricted and excluded losses, more (M, N, V) tensors at the evaluation (the
    logits gathered per residue, the key part per pair, the excluded logits and their loss pass)
plus a fixed cost (allocator arenas, oneDNN buffers; torch.compile's compiler, when it compiles).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from fastgrok.config import ConfigError, TrainConfig
from fastgrok.core.models import build_model
from fastgrok.core.step import use_compile

PARAM_COPIES = 10
"""flat, m, v, grad, AdamW's new flat/m/v, and the where() copies of the divergence guard."""
MLP_H, MLP_V = 6, 10
"""(M, N, H) and (M, N, V) tensors alive at the peak (measured, then rounded up)."""
TF_D, TF_MLP, TF_ATT, TF_V = 16, 6, 8, 10
"""Transformer: (M, N, T, D), (M, N, T, d_mlp), (M, N, Nh, T, T) and (M, N, V) tensors alive at the peak (T = 3
tokens, or 4 with the op token)."""
TF1_TD, TF1_D = 6, 10
"""One layer (`Transformer.logits` runs only the values' mix at every token): (M, N, T, D) and (M, N, D)
tensors alive at the peak, beside TF_MLP (M, N, d_mlp), TF_ATT (M, N, T, Nh) and TF_V (M, N, V) ones.
Estimated from the two-layer terms, not measured term by term: at p = 43 the bound is 2.1x the measured
cost of one more model (27.7 MiB, tests/test_memory.py), the old terms' 4.4x."""
RESTRICTED_V = 12
"""More (M, N, V) tensors alive at the evaluation's peak with `restricted_loss` (MLP): measured 9.3 at p = 97
(90 vs 57 MiB per model, `benchmarks/memory_peak.py --case mlp 97 10 off --restricted-loss`), rounded up."""
FIXED = 256 * 2**20
"""Bytes any run adds whatever its size (allocator arenas, kernels' workspaces)."""
FIXED_COMPILE = 1024 * 2**20
"""More when the step is compiled: the compiler in the process (~100 MiB measured) and its C++ build
subprocesses (the largest ~630 MiB, torch imported: benchmarks/RESULTS.md)."""


def bytes_per_model(cfg: TrainConfig) -> int:
    """An upper bound of the bytes one model of cfg adds at the peak (`estimate_bytes` less the fixed cost)."""
    model = build_model(cfg)
    P = model.layout.n_params
    N, V = cfg.n_pairs, cfg.p
    if cfg.model == "mlp":                      # the peers' MLP: MLP_H per hidden layer (estimated, not measured)
        rows = MLP_H * cfg.hidden * cfg.mlp_layers + (MLP_V + (RESTRICTED_V if cfg.restricted_loss else 0)) * V
    else:                                   # T tokens a row (4 with Lee et al.'s op token), n_out logits
        T, V = model.T, model.n_out
        if cfg.n_layers == 1:
            rows = T * (TF1_TD * cfg.d_model + TF_ATT * cfg.n_heads) + TF1_D * cfg.d_model + TF_MLP * cfg.d_mlp + TF_V * V
        else:
            rows = T * (TF_D * cfg.d_model + TF_MLP * cfg.d_mlp + TF_ATT * T * cfg.n_heads) + TF_V * V
    dsize = 8 if cfg.dtype == "float64" else 4
    index = 3 * 8 * cfg.n_train + cfg.n_pairs                      # train rows a, b, y (int64), train mask
    return dsize * (PARAM_COPIES * P + N * rows) + 3 * index


def fixed_bytes(compiled: bool) -> int:
    return FIXED + (FIXED_COMPILE if compiled else 0)


def estimate_bytes(cfg: TrainConfig, n_models: int, device: torch.device) -> int:
    """Upper bound of the peak bytes a run of n_models of cfg adds (on a CUDA device the compiler's
    memory is the host's: only the fixed allocator cost counts there)."""
    compiled = use_compile(cfg, device) and device.type == "cpu"
    return n_models * bytes_per_model(cfg) + fixed_bytes(compiled)


def device_memory(device: torch.device) -> int | None:
    """Bytes the run can have: the device's total memory on CUDA; on a CPU the memory available now
    (MemAvailable: free plus what the kernel can reclaim), not the machine's total, since other
    processes hold the rest, and no more than this process's own limits leave it (`limit_room`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    room = limit_room()
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return min(info["MemAvailable"], room) if room is not None else info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return room
    return min(total, room) if room is not None else total


LIMITS = (("RLIMIT_AS", "VmSize", "ulimit -v"), ("RLIMIT_DATA", "VmData", "ulimit -d"))
"""The resource limits on a process's memory, the /proc/self/status size each caps, and the shell's name."""


def _limits() -> list[tuple[int, str]]:
    """(bytes this process may still map, the shell's name) for each memory limit set on it."""
    try:
        import resource
        with open("/proc/self/status") as f:
            status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith("Vm")}
    except (ImportError, OSError, ValueError, IndexError):
        return []
    out = []
    for name, key, shell in LIMITS:
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY and key in status:
            out.append((max(0, soft - status[key]), shell))
    return out


def limit_room() -> int | None:
    """Bytes this process may still map under its address-space and data limits (`ulimit -v`, `ulimit
    -d`; their soft limits less what it maps now: a run past them fails to allocate), or None when
    neither is set. The run's estimate counts resident bytes, which never exceed the mapped ones."""
    limits = _limits()
    return min(room for room, _ in limits) if limits else None


def largest_fitting(cfg: TrainConfig, n_models: int, have: int, device: torch.device) -> str:
    """What would fit in `have` bytes: fewer models, else the largest p for one model."""
    from dataclasses import replace
    per, fixed = bytes_per_model(cfg), estimate_bytes(cfg, 0, device)
    m = (have - fixed) // per if have > fixed else 0
    if m >= 1:
        return f"at most {m} model(s) of this size fit (e.g. --seeds {max(1, m // max(1, len(cfg.cells)))})"
    lo, hi = 2, cfg.p                                           # the largest p with one model fitting
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_bytes(replace(cfg, p=mid, seeds=1, taus=(1.0,), norm_targets=()), 1, device) <= have:
            lo = mid
        else:
            hi = mid - 1
    return f"not even one model of this size fits; one fits up to p = {lo}" if lo > 2 else \
        "not even one model of the smallest size fits"


def check_fits(cfg: TrainConfig, n_models: int, device: torch.device) -> None:
    """A ConfigError (one line: what is needed, what the device has, what would fit), before anything is
    allocated or written, when n_models of cfg may not fit: the estimate is an upper bound of the peak."""
    need, have = estimate_bytes(cfg, n_models, device), device_memory(device)
    if have is not None and need > have:
        limits = [shell for room, shell in _limits() if room <= have] if device.type == "cpu" else []
        where = f"this process's limit ({limits[0]}) leaves it" if limits else f"this {device.type} has"
        raise ConfigError(f"{n_models} model(s) at p = {cfg.p} ({cfg.model}, {cfg.dtype}) need up to "
                          f"{need / 2**30:,.2f} GiB; {where} {have / 2**30:,.2f} GiB available: "
                          f"{largest_fitting(cfg, n_models, have, device)}")


_MEASURE = r"""
import json, resource, sys, tempfile
import torch
torch.set_num_threads(1)
from fastgrok.cli import main
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
base = status("VmRSS")
with tempfile.TemporaryDirectory() as d:
    rc = main(["train", *sys.argv[1:], "--quiet", "--device", "cpu", "--out", d + "/run"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big process (pytest
# after many tests) would report its parent's size
print(json.dumps({"rc": rc, "base": base, "peak": status("VmHWM"),
                  "child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measure_peak(args: list[str], timeout: float = 1200) -> dict:
    """Run `fastgrok train ARGS` on the CPU in a fresh process (one thread, a cold compile cache) and
    return {"rc", "base", "peak", "child"} in bytes: the resident set once torch and fastgrok are imported,
    the process's peak resident set (VmHWM), and the largest child's (the compiler's; ru_maxrss, which
    counts what a child inherited at fork, so an upper bound)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        r = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env,
                           timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"fastgrok train {' '.join(args)} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
