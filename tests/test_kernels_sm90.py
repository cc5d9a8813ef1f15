"""The Triton kernels compiled for an H100/H200 (sm_90) on this CPU machine, by triton's own backend: each
launch configuration the launchers pick compiles, and none spills registers (local memory or a stack of
kilobytes: the old clamp lookup took 2,848 bytes of stack at the transformer's 27 segments). Runs
benchmarks/sm90_registers.py in a process without TRITON_INTERPRET (this session's tests interpret)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sm90_registers.py"


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("REG") == 26 and "SPILLS" not in r.stdout
