"""Test set-up: the Triton interpreter must be switched on before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny models on a shared 2-core machine run ~10x
    slower with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
