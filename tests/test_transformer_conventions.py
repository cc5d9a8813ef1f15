"""The peers' transformers as settings (config.TF_PRESETS, tf_* fields) against independent float64 references:
Lee et al.'s Decoder (ironjr/grokfast main.py: nn.MultiheadAttention, nn.Linear, nn.LayerNorm, sequence first)
and Nanda et al.'s Transformer (progress-measures-paper transformers.py: einsums, ReLU, MLP biases, no LN),
each written here as its authors wrote it, loaded with fastgrok's weights; logits and gradients equal."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgrok.config import TF_PRESETS, ConfigError, TrainConfig
from fastgrok.core.models import Transformer


# ------------------------------------------------------------------ Lee et al.'s Decoder, as in their main.py
class LeeBlock(nn.Module):
    def __init__(self, dim, num_heads, d_mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, d_mlp), nn.GELU(), nn.Linear(d_mlp, dim))

    def forward(self, x):
        attn_mask = torch.full((len(x), len(x)), -float("Inf"), device=x.device, dtype=x.dtype)
        attn_mask = torch.triu(attn_mask, diagonal=1)
        x = self.ln_1(x)
        a, _ = self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)
        x = x + a
        m = self.mlp(self.ln_2(x))
        x = x + m
        return x


class LeeDecoder(nn.Module):
    def __init__(self, dim, num_layers, num_heads, num_tokens, seq_len, d_mlp):
        super().__init__()
        self.token_embeddings = nn.Embedding(num_tokens, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.layers = nn.ModuleList([LeeBlock(dim, num_heads, d_mlp) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, x):                                  # x (T, N)
        h = self.token_embeddings(x)
        positions = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
        h = h + self.position_embeddings(positions).expand_as(h)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))


def lee_from(P: dict, cfg: TrainConfig) -> LeeDecoder:
    """Lee's Decoder holding fastgrok's weights (one model's; torch's Linear keeps W transposed)."""
    ref = LeeDecoder(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.p + 2, 4, cfg.d_mlp).double()
    with torch.no_grad():
        ref.token_embeddings.weight.copy_(P["W_E"])
        ref.position_embeddings.weight.copy_(P["W_pos"])
        for i, blk in enumerate(ref.layers):
            blk.attn.in_proj_weight.copy_(torch.cat([P[f"W_{c}{i}"].T for c in "QKV"]))
            blk.attn.in_proj_bias.copy_(torch.cat([P[f"b_{c}{i}"] for c in "QKV"]))
            blk.attn.out_proj.weight.copy_(P[f"W_O{i}"].T)
            blk.attn.out_proj.bias.copy_(P[f"b_O{i}"])
            blk.mlp[0].weight.copy_(P[f"W_in{i}"].T)
            blk.mlp[0].bias.copy_(P[f"b_in{i}"])
            blk.mlp[2].weight.copy_(P[f"W_out{i}"].T)
            blk.mlp[2].bias.copy_(P[f"b_out{i}"])
            for ln, n in ((blk.ln_1, f"ln1_{i}"), (blk.ln_2, f"ln2_{i}")):
                ln.weight.copy_(P[n + "_g"])
                ln.bias.copy_(P[n + "_b"])
        ref.ln_f.weight.copy_(P["lnf_g"])
        ref.ln_f.bias.copy_(P["lnf_b"])
        ref.head.weight.copy_(P["W_U"].T)
    return ref


def lee_named(ref: LeeDecoder, cfg: TrainConfig, get=lambda t: t.grad) -> dict:
    """The reference's gradients (or, get=Tensor.detach, its weights) under fastgrok's names."""
    D = cfg.d_model
    out = {"W_E": get(ref.token_embeddings.weight), "W_pos": get(ref.position_embeddings.weight),
           "W_U": get(ref.head.weight).T, "lnf_g": get(ref.ln_f.weight), "lnf_b": get(ref.ln_f.bias)}
    for i, blk in enumerate(ref.layers):
        for j, c in enumerate("QKV"):
            out[f"W_{c}{i}"] = get(blk.attn.in_proj_weight)[j * D:(j + 1) * D].T
            out[f"b_{c}{i}"] = get(blk.attn.in_proj_bias)[j * D:(j + 1) * D]
        out.update({f"W_O{i}": get(blk.attn.out_proj.weight).T, f"b_O{i}": get(blk.attn.out_proj.bias),
                    f"W_in{i}": get(blk.mlp[0].weight).T, f"b_in{i}": get(blk.mlp[0].bias),
                    f"W_out{i}": get(blk.mlp[2].weight).T, f"b_out{i}": get(blk.mlp[2].bias),
                    f"ln1_{i}_g": get(blk.ln_1.weight), f"ln1_{i}_b": get(blk.ln_1.bias),
                    f"ln2_{i}_g": get(blk.ln_2.weight), f"ln2_{i}_b": get(blk.ln_2.bias)})
    return out


# ------------------------------------------------------------------ Nanda et al.'s Transformer, as in transformers.py
class NandaTransformer(nn.Module):
    """progress-measures-paper's Transformer (use_ln False, act_type ReLU): W_E (d_model, d_vocab), heads'
    W_Q/W_K/W_V (heads, d_head, d_model), W_O (d_model, d_head * heads), MLP with b_in, b_out, W_U (d_model,
    d_vocab); attention masked by tril - 1e10 (1 - mask)."""

    def __init__(self, P: dict, cfg: TrainConfig):
        super().__init__()
        D, Nh = cfg.d_model, cfg.n_heads
        dh = D // Nh
        self.dh, self.L = dh, cfg.n_layers
        par = lambda t: nn.Parameter(t.detach().clone())     # noqa: E731
        self.W_E, self.W_pos, self.W_U = par(P["W_E"].T), par(P["W_pos"]), par(P["W_U"])
        for i in range(cfg.n_layers):
            for c in "QKV":
                setattr(self, f"W_{c}{i}", par(P[f"W_{c}{i}"].T.reshape(Nh, dh, D)))
            setattr(self, f"W_O{i}", par(P[f"W_O{i}"].T))
            setattr(self, f"W_in{i}", par(P[f"W_in{i}"].T))
            setattr(self, f"W_out{i}", par(P[f"W_out{i}"].T))
            setattr(self, f"b_in{i}", par(P[f"b_in{i}"]))
            setattr(self, f"b_out{i}", par(P[f"b_out{i}"]))

    def forward(self, x):                                  # x (N, 3)
        x = torch.einsum("dbp -> bpd", self.W_E[:, x]) + self.W_pos[: x.shape[-1]]
        n = x.shape[-2]
        mask = torch.tril(torch.ones((n, n), dtype=x.dtype))
        for i in range(self.L):
            k = torch.einsum("ihd,bpd->biph", getattr(self, f"W_K{i}"), x)
            q = torch.einsum("ihd,bpd->biph", getattr(self, f"W_Q{i}"), x)
            v = torch.einsum("ihd,bpd->biph", getattr(self, f"W_V{i}"), x)
            scores = torch.einsum("biph,biqh->biqp", k, q)
            scores = torch.tril(scores) - 1e10 * (1 - mask)
            att = F.softmax(scores / math.sqrt(self.dh), dim=-1)
            z = torch.einsum("biph,biqp->biqh", v, att)
            z = torch.einsum("df,bqf->bqd", getattr(self, f"W_O{i}"), z.permute(0, 2, 1, 3).reshape(*z.shape[:1], n, -1))
            x = x + z
            h = F.relu(torch.einsum("md,bpd->bpm", getattr(self, f"W_in{i}"), x) + getattr(self, f"b_in{i}"))
            x = x + torch.einsum("dm,bpm->bpd", getattr(self, f"W_out{i}"), h) + getattr(self, f"b_out{i}")
        return x @ self.W_U

    def grads(self, cfg) -> dict:
        out = {"W_E": self.W_E.grad.T, "W_pos": self.W_pos.grad, "W_U": self.W_U.grad}
        for i in range(cfg.n_layers):
            for c in "QKV":
                out[f"W_{c}{i}"] = getattr(self, f"W_{c}{i}").grad.reshape(cfg.d_model, cfg.d_model).T
            for n in ("W_O", "W_in", "W_out"):
                out[f"{n}{i}"] = getattr(self, f"{n}{i}").grad.T
            for n in ("b_in", "b_out"):
                out[f"{n}{i}"] = getattr(self, f"{n}{i}").grad
        return out


def _cfg(preset: str, **kw) -> TrainConfig:
    return TrainConfig(model="transformer", dtype="float64", compile="off", device="cpu",
                       **{**TF_PRESETS[preset], "d_model": 16, "n_heads": 4, "d_mlp": 24, "p": 7, **kw})


def _fastgrok(cfg, a, b, y, M=2):
    """fastgrok's logits (M, N, V) and the gradient of each model's summed CE, as named (M, ...) tensors."""
    model = Transformer(cfg)
    flat = model.layout.init(list(range(M)), torch.float64, "cpu")
    with torch.no_grad():                                  # random vectors too: a zero bias tests little
        flat[:, model.layout.n_mat:] += 0.3 * torch.randn(M, model.layout.n_params - model.layout.n_mat,
                                                          generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaf = flat.clone().requires_grad_(True)
    z = model.logits(leaf, a, b)
    F.cross_entropy(z.reshape(-1, z.shape[-1]), y.repeat(M), reduction="sum").backward()
    return model, flat, z.detach(), model.layout.views(leaf.grad)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_lee_transformer_matches_their_decoder_float64(n_layers):
    cfg = _cfg("lee", n_layers=n_layers)
    p = cfg.p
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T     # their pairs: y in [1, p)
    y = a * b % p
    model, flat, z, grads = _fastgrok(cfg, a, b, y)
    assert z.shape[-1] == p + 2                             # their head: a logit per token, p + 2
    for m in range(flat.shape[0]):
        P = {k: v[m] for k, v in model.layout.views(flat).items()}
        ref = lee_from(P, cfg)
        seq = torch.stack([a, torch.full_like(a, p + 1), b, torch.full_like(a, p)])   # (T, N): x, op, y, =
        logits = ref(seq)[-1]
        F.cross_entropy(logits, y, reduction="sum").backward()
        torch.testing.assert_close(z[m], logits.detach(), rtol=1e-10, atol=1e-10)
        for name, g in lee_named(ref, cfg).items():
            torch.testing.assert_close(grads[name][m], g, rtol=1e-9, atol=1e-10, msg=name)


def test_nanda_transformer_matches_their_transformer_float64():
    cfg = _cfg("nanda")
    p = cfg.p
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    y = (a + b) % p
    model, flat, z, grads = _fastgrok(cfg, a, b, y)
    assert z.shape[-1] == p + 1                             # their W_U: d_vocab = p + 1 outputs
    for m in range(flat.shape[0]):
        ref = NandaTransformer({k: v[m] for k, v in model.layout.views(flat).items()}, cfg).double()
        logits = ref(torch.stack([a, b, torch.full_like(a, p)], -1))[:, -1]
        F.cross_entropy(logits, y, reduction="sum").backward()
        torch.testing.assert_close(z[m], logits.detach(), rtol=1e-10, atol=1e-10)
        for name, g in ref.grads(cfg).items():
            torch.testing.assert_close(grads[name][m], g, rtol=1e-9, atol=1e-10, msg=name)


def test_torch_init_draws_as_lee_decoders_defaults():
    """tf_init torch: each parameter's spread and range as PyTorch's defaults give Lee et al.'s Decoder
    (nn.Embedding N(0, 1), Xavier in-projection, nn.Linear U(+-1/sqrt(fan_in)) with its bias, zero attention
    biases), at their size; compared by the std and the largest entry of each tensor."""
    cfg = TrainConfig(model="transformer", p=97, **{**TF_PRESETS["lee"]})
    model = Transformer(cfg)
    flat = model.layout.init([3], torch.float32, "cpu")
    P = {k: v[0].double() for k, v in model.layout.views(flat).items()}
    torch.manual_seed(0)
    ref = LeeDecoder(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.p + 2, 4, cfg.d_mlp).double()
    theirs = lee_named(ref, cfg, get=torch.Tensor.detach)
    theirs["W_pos"] = theirs["W_pos"][:4]
    for name, w in theirs.items():
        ours = P[name]
        if float(w.std()) == 0:
            assert (ours == w).all(), name       # zero biases, LayerNorm 1 and 0
            continue
        assert abs(float(ours.std()) / float(w.std()) - 1) < 0.12, name
        if not name.startswith("W_E") and not name.startswith("W_pos"):      # uniform draws: the same bound
            assert abs(float(ours.abs().max()) / float(w.abs().max()) - 1) < 0.05, name


def test_nanda_init_is_their_scales():
    """tf_init nanda: progress-measures-paper's randn / sqrt(d_model) for every matrix, W_U / sqrt(d_vocab)."""
    cfg = TrainConfig(model="transformer", p=113, **TF_PRESETS["nanda"])
    model = Transformer(cfg)
    P = model.layout.views(model.layout.init([0], torch.float64, "cpu"))
    for name, w in P.items():
        if name.startswith("b_"):
            assert (w == 0).all()
            continue
        want = 1 / math.sqrt(cfg.p + 1 if name == "W_U" else cfg.d_model)
        assert abs(float(w.std()) / want - 1) < 0.1, name


@pytest.mark.parametrize("field, value", [("tf_act", "swish"), ("tf_tokens", "a b"), ("tf_bias", True),
                                          ("tf_init", "xavier"), ("tf_unembed", "all"), ("tf_block", "post")])
def test_a_bad_convention_is_one_error_naming_it(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must be one of .*; got {value!r}$"):
        TrainConfig(model="transformer", **{field: value})


def test_restricted_loss_with_logits_over_the_vocabulary_is_one_error():
    with pytest.raises(ConfigError, match="^restricted_loss reads p logits a row: it needs tf_unembed 'p', got 'vocab'$"):
        TrainConfig(model="transformer", tf_unembed="vocab", restricted_loss=True)
