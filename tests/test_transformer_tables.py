"""The transformer's exact rewrites (issue 31): block 0 from per-position tables and the last block at the
last position only (`Transformer.logits`) against the direct computation (`Transformer._logits_full`), and
the bit-for-bit properties batched == solo rests on for the new gathers and broadcasts."""
import pytest
import torch

from fastgrok.config import TF_PRESETS, TrainConfig
from fastgrok.core.models import ROW_BLOCK, Transformer, _Broadcast, _row_sum

CASES = {"1-layer": {}, "1-layer-ln": dict(layernorm=True), "2-layers": dict(n_layers=2),
         "2-layers-ln": dict(n_layers=2, layernorm=True), "3-layers-ln-biases": dict(n_layers=3, layernorm=True, tf_bias="all"),
         "lee": TF_PRESETS["lee"], "lee-1-layer": {**TF_PRESETS["lee"], "n_layers": 1}, "nanda": TF_PRESETS["nanda"],
         "nanda-2-layers": {**TF_PRESETS["nanda"], "n_layers": 2}}


def _cfg(case, p, dtype="float64"):
    return TrainConfig(**{"model": "transformer", "p": p, **CASES[case], "d_model": 32, "d_mlp": 48, "n_heads": 4,
                          "dtype": dtype})


def _params(model, M, dtype, seed=0):
    """Random parameters, vectors included (a zero bias or a unit gain tests little)."""
    g = torch.Generator().manual_seed(seed)
    flat = model.layout.init(list(range(M)), dtype, "cpu")
    return flat + 0.3 * torch.randn(flat.shape, generator=g, dtype=dtype)


def _logits_and_grad(fn, flat, a, b, dz):
    leaf = flat.clone().requires_grad_(True)
    z = fn(leaf, a, b)
    return z.detach(), torch.autograd.grad(z, leaf, dz)[0]


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("p", [13, 23])
@pytest.mark.parametrize("case", list(CASES))
def test_the_rewritten_logits_and_gradient_equal_the_full_computation_float64(case, p, per_model):
    model, M, N = Transformer(_cfg(case, p)), 3, 150
    flat = _params(model, M, torch.float64)
    g = torch.Generator().manual_seed(1)
    shape = (M, N) if per_model else (N,)
    a, b = torch.randint(0, p, shape, generator=g), torch.randint(0, p, shape, generator=g)
    dz = torch.randn(M, N, model.n_out, generator=g, dtype=torch.float64)
    z, grad = _logits_and_grad(model.logits, flat, a, b, dz)
    z_ref, grad_ref = _logits_and_grad(model._logits_full, flat, a, b, dz)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12 * z_ref.abs().max().item())
    # relative to the whole gradient: b_K's is zero exactly (softmax ignores a shift shared by every key),
    # in either form rounding noise
    scale = grad_ref.abs().max().item()
    assert scale > 0
    for name, x in model.layout.views(grad).items():
        ref = model.layout.views(grad_ref)[name]
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12 * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["1-layer", "2-layers-ln", "lee", "lee-1-layer", "nanda"])
def test_each_models_gradient_in_a_batch_is_bitwise_its_solo_gradient(case, dtype):
    """Three models (own rows, one of them followed by zero-gradient padding rows) against each alone: the
    logits and every gradient entry bit for bit (a 1-row bmm, the first form of `_Broadcast`'s backward,
    went another BLAS path for one model than for three)."""
    p, M, N, pad = 23, 3, 300, 200
    model = Transformer(_cfg(case, p, "float64" if dtype == torch.float64 else "float32"))
    flat = _params(model, M, dtype)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, p, (M, N + pad), generator=g), torch.randint(0, p, (M, N + pad), generator=g)
    dz = torch.randn(M, N + pad, model.n_out, generator=g, dtype=dtype)
    n = [N + pad, N, N + pad]                                     # model 1 is padded
    dz[1, N:] = 0
    torch.set_num_threads(1)
    z, grad = _logits_and_grad(model.logits, flat, a, b, dz)
    for m in range(M):
        z1, g1 = _logits_and_grad(model.logits, flat[m:m + 1], a[m, :n[m]], b[m, :n[m]], dz[m:m + 1, :n[m]])
        assert torch.equal(z[m, :n[m]], z1[0])
        for name, x in model.layout.views(grad[m:m + 1]).items():
            assert torch.equal(x, model.layout.views(g1)[name]), (m, name)


def test_row_sum_is_the_sum_and_ignores_padding_and_other_models():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2 * ROW_BLOCK + 37, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_row_sum(x), x.sum(1, keepdim=True), rtol=1e-13, atol=1e-13)
    x = x.float()
    padded = torch.cat([x, torch.zeros(3, 300, 10)], 1)
    assert torch.equal(_row_sum(x), _row_sum(padded))
    assert torch.equal(_row_sum(x)[1:2], _row_sum(x[1:2]))
    row = torch.randn(3, 1, 10, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, 700, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(_Broadcast.apply(row, 700), row, d)[0],
                               torch.autograd.grad(row.expand(-1, 700, -1), row, d)[0], rtol=1e-13, atol=1e-13)


def test_step_flops_counts_the_work_the_transformer_does():
    """By hand (2 FLOPs a multiply-add, 3 products each): one layer, p = 59, d 128, MLP 512, 1,392 pairs:
    per pair W_O, the MLP and W_U at "="; per step the K and V tables (2p + 1 rows) and "="'s Q. Two layers:
    block 0's W_O and MLP at 3 tokens, block 1's K, V at 3 and Q, W_O, MLP at 1, its tables' Q on every row.
    Lee's: 4 tokens, logits over the vocabulary (p + 2)."""
    from fastgrok.core.models import step_flops
    d, H, n = 128, 512, 1392
    one = TrainConfig(model="transformer", p=59)
    assert one.n_train == n
    assert step_flops(one) == 6 * (n * (d * d + 2 * d * H + d * 59) + 119 * 2 * d * d + d * d)
    two = TrainConfig(model="transformer", p=59, n_layers=2)
    assert step_flops(two) == 6 * (n * (3 * (d * d + 2 * d * H) + 3 * 2 * d * d + 2 * d * d + 2 * d * H + d * 59)
                                   + 119 * 3 * d * d)
    lee = TrainConfig(model="transformer", p=59, **TF_PRESETS["lee"])
    assert step_flops(lee) == 6 * (n * (4 * (d * d + 2 * d * H) + 4 * 2 * d * d + 2 * d * d + 2 * d * H + d * 61)
                                   + 120 * 3 * d * d)
    three = TrainConfig(model="transformer", p=59, n_layers=3)
    assert step_flops(three) - step_flops(two) == 6 * n * 3 * (4 * d * d + 2 * d * H)
