"""`fastgrok export`: a run's weights in the formats other tools read.

    fastgrok export DIR --snapshot STEP --to safetensors OUT.safetensors
        the snapshot file(s) of STEP (a grid: every batch's) as one safetensors file, a named tensor per
        model and parameter, `model{K}.{name}` (K: the models.parquet `model` id; names as in the .npz:
        E, W1, W2, b1, b2 or W_E, W_pos, W_Q0, ...), metadata {"step", "models", "reasons", "format"}.
        The sealed .npz stays the canonical file; this is a copy (`snapshots.load` reads the same values).
    fastgrok export DIR --model K [--snapshot STEP] --to transformer-lens OUT/
        model K of a `fastgrok train` run (its final weights from the checkpoint, or those of a snapshot)
        as a TransformerLens HookedTransformer: OUT/config.json (HookedTransformerConfig's fields) and
        OUT/state_dict.pt; `load_transformer_lens(OUT)` builds it. The MLP has no TransformerLens form: it
        is written as a plain torch.nn.Module (`ExportedMLP`, the study's or the peers' MLP, its shape fields
        in OUT/config.json; tokens (N, 2) -> logits (N, p)), read back by `load_mlp(OUT)`. Both give fastgrok's logits on all p^2 inputs to float32 rounding.

Mapping onto TransformerLens: tokens [a, b, =] with "=" the token p (d_vocab p + 1, n_ctx 3, d_vocab_out
p), learned positions, causal attention scaled by 1/sqrt(d_head), fastgrok's exact-erf GeLU ("gelu"),
pre-LayerNorm (eps 1e-5, as torch's layer_norm) only when the run had it, all biases zero. The peers'
conventions (tf_*) map too: [a, op, b, =] (n_ctx 4, d_vocab p + 2), logits over the vocabulary
(d_vocab_out), ReLU, the biases the model has; Lee et al.'s block (tf_block lee) has no TransformerLens
form and is refused in one line. A head's
columns of W_Q/W_K/W_V are its slice h*d_head:(h+1)*d_head, as in fastgrok's unflatten(-1, (heads, d_head)).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastgrok.train import snapshots
from fastgrok import store
from fastgrok.config import STUDY_MLP, ConfigError
from fastgrok.train.tracking import need

FORMATS = ("safetensors", "transformer-lens")


def snapshot_files(run_dir: Path, step: int) -> list[Path]:
    """The snapshot files of `step` in a run (a train run's snapshots/, a grid's snapshots/<batch>/)."""
    root = Path(run_dir) / "snapshots"
    name = snapshots.file_name(step)
    files = sorted([root / name] if (root / name).is_file() else root.glob(f"*/{name}"))
    if not files:
        have = sorted({int(f.stem.split("_")[1]) for f in root.glob("**/step_*.npz")})
        raise ConfigError(f"{run_dir} has no snapshot of step {step:,}" + (
            f" (steps with snapshots: {', '.join(map(str, have[:20]))}{' ...' if len(have) > 20 else ''})"
            if have else " (no snapshots: train with --snapshots N)"))
    return files


def snapshot_tensors(run_dir: Path, step: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Named per-model arrays `model{K}.{name}` of step's snapshot(s), and the metadata written with them."""
    out, models, reasons = {}, [], []
    for f in snapshot_files(run_dir, step):
        z = snapshots.load(f)
        names = [k for k in z if k not in ("models", "reason", "flat")]
        for i, (m, r) in enumerate(zip(z["models"], z["reason"])):
            models.append(int(m))
            reasons.append(str(r))
            out.update({f"model{int(m)}.{n}": np.ascontiguousarray(z[n][i]) for n in names})
    meta = {"format": "fastgrok-snapshot", "step": str(step), "models": json.dumps(models),
            "reasons": json.dumps(reasons)}
    return out, meta


def to_safetensors(run_dir: Path, step: int, out: Path) -> Path:
    st = need("safetensors.numpy", "safetensors")
    tensors, meta = snapshot_tensors(run_dir, step)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(out), metadata=meta)
    return out


# ------------------------------------------------------------------ one model's weights
def model_params(run_dir: Path, model: int, step: int | None = None):
    """(TrainConfig, {name: float32 torch tensor}) of model K: from step's snapshot, else the checkpoint
    of a `fastgrok train` run (its final weights)."""

    from fastgrok.train.trainer import load_config
    run_dir = Path(run_dir)
    if store.holds_grid_run(run_dir):
        if step is None:
            raise ConfigError(f"{run_dir} holds a grid run, which keeps no final checkpoint: give --snapshot STEP "
                              "(a grid trained with [train] snapshots)")
        cfg = grid_model_config(run_dir, model)
    else:
        cfg = load_config(run_dir)
        if not 0 <= model < cfg.n_models:
            raise ConfigError(f"--model {model}: the run has models 0..{cfg.n_models - 1}")
    layout = snapshots.layout_of(cfg)
    if step is not None:
        for f in snapshot_files(run_dir, step):
            z = snapshots.load(f)
            hit = np.nonzero(z["models"] == model)[0]
            if len(hit):
                flat = torch.from_numpy(z["flat"][hit[:1]])
                break
        else:
            raise ConfigError(f"the snapshot of step {step:,} does not hold model {model}")
    else:
        ck = store.load_checkpoint(run_dir)
        if ck is None:
            raise ConfigError(f"{run_dir} has no checkpoint; give --snapshot STEP")
        rows = ck.get("rows")
        rows = list(range(cfg.n_models)) if rows is None else [int(r) for r in rows]
        if model not in rows:
            raise ConfigError(f"the checkpoint of {run_dir} does not hold model {model}; give --snapshot STEP")
        flat = ck["state"]["flat"][rows.index(model)][None]
    return cfg, {k: v[0].to(torch.float32).clone() for k, v in layout.views(flat).items()}


def grid_model_config(run_dir: Path, model: int):
    """The TrainConfig of a grid's model K: its cell's (plan.json: cells from model0, seeds of them)."""
    from fastgrok.grid.experiments import ExperimentSpec
    from fastgrok.grid.plan import cell_config
    from fastgrok.store import read_plan
    plan = read_plan(run_dir)
    cell = next((c for c in plan["cells"] if c.get("model0", -1) <= model < c.get("model0", -1) + c["seeds"]), None)
    if cell is None:
        raise ConfigError(f"--model {model}: no cell of the grid holds that model")
    return cell_config(ExperimentSpec.from_dict(store.read_json(Path(run_dir) / store.SPEC_JSON)), cell)


# ------------------------------------------------------------------ TransformerLens
def tl_config(cfg) -> dict:
    """HookedTransformerConfig's fields for a fastgrok transformer config."""
    op = cfg.tf_tokens == "a op b ="                            # the op token: one more token and position
    return dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=3 + op, d_head=cfg.d_model // cfg.n_heads,
                n_heads=cfg.n_heads, d_mlp=cfg.d_mlp, d_vocab=cfg.p + 1 + op,
                d_vocab_out=cfg.p + 1 + op if cfg.tf_unembed == "vocab" else cfg.p, act_fn=cfg.tf_act,
                normalization_type="LN" if cfg.layernorm else None, eps=1e-5, attention_dir="causal",
                positional_embedding_type="standard", default_prepend_bos=False,
                original_architecture="fastgrok", seed=0)


def tl_state_dict(cfg, P: dict) -> dict:
    """fastgrok's named parameters as TransformerLens's (shapes per head; the biases fastgrok's model
    lacks (tf_bias) are left to the caller's zeros)."""
    D, Nh = cfg.d_model, cfg.n_heads
    dh = D // Nh
    sd = {"embed.W_E": P["W_E"], "pos_embed.W_pos": P["W_pos"], "unembed.W_U": P["W_U"]}
    for i in range(cfg.n_layers):
        for c in "QKV":                                             # (D, D) -> (Nh, D, dh)
            sd[f"blocks.{i}.attn.W_{c}"] = P[f"W_{c}{i}"].view(D, Nh, dh).permute(1, 0, 2)
        sd[f"blocks.{i}.attn.W_O"] = P[f"W_O{i}"].view(Nh, dh, D)
        sd[f"blocks.{i}.mlp.W_in"], sd[f"blocks.{i}.mlp.W_out"] = P[f"W_in{i}"], P[f"W_out{i}"]
        if f"b_Q{i}" in P:                                          # (D,) -> (Nh, dh); b_O stays (D,)
            for c in "QKV":
                sd[f"blocks.{i}.attn.b_{c}"] = P[f"b_{c}{i}"].view(Nh, dh)
            sd[f"blocks.{i}.attn.b_O"] = P[f"b_O{i}"]
        if f"b_in{i}" in P:
            sd[f"blocks.{i}.mlp.b_in"], sd[f"blocks.{i}.mlp.b_out"] = P[f"b_in{i}"], P[f"b_out{i}"]
        if cfg.layernorm:
            for ln, src in (("ln1", f"ln1_{i}"), ("ln2", f"ln2_{i}")):
                sd[f"blocks.{i}.{ln}.w"], sd[f"blocks.{i}.{ln}.b"] = P[src + "_g"], P[src + "_b"]
    if cfg.layernorm:
        sd["ln_final.w"], sd["ln_final.b"] = P["lnf_g"], P["lnf_b"]
    return {k: v.contiguous() for k, v in sd.items()}


def _tl_model(config: dict):
    lens = need("transformer_lens", "transformer-lens")
    return lens.HookedTransformer(lens.HookedTransformerConfig(**config))


def to_transformer_lens(run_dir: Path, model: int, out: Path, step: int | None = None) -> Path:
    cfg, P = model_params(run_dir, model, step)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a directory to export into")
    if cfg.model == "mlp":
        shape = {"p": cfg.p, "d_embed": cfg.d_embed, "hidden": cfg.hidden, **{k: getattr(cfg, k) for k in STUDY_MLP}}
        module = ExportedMLP(**shape)
        module.load_state_dict(P)
        config, sd = {"model": "mlp", **shape}, module.state_dict()
    elif cfg.tf_block != "pre":
        raise ConfigError(f"tf_block {cfg.tf_block!r} (Lee et al.'s block: the residual stream through LN1) has "
                          "no TransformerLens form; export --to safetensors instead")
    else:
        config = tl_config(cfg)
        tl = _tl_model(config)
        sd = tl.state_dict()
        ours = tl_state_dict(cfg, P)
        for k, v in sd.items():         # every bias fastgrok's transformer lacks zero; buffers kept
            if k in ours:
                sd[k] = ours[k]
            elif k.rsplit(".", 1)[-1].startswith("b_"):
                sd[k] = torch.zeros_like(v)
        tl.load_state_dict(sd, strict=True)
        config = {"model": "transformer-lens", **config}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "state_dict.pt")
    store.write_json(out / "config.json", config)
    return out


def load_transformer_lens(directory: Path):
    """The HookedTransformer `fastgrok export --to transformer-lens` wrote into directory."""
    config = store.read_json(Path(directory) / "config.json")
    config.pop("model", None)
    tl = _tl_model(config)
    tl.load_state_dict(torch.load(Path(directory) / "state_dict.pt", weights_only=True), strict=True)
    return tl


def load_mlp(directory: Path):
    """The ExportedMLP `fastgrok export --to transformer-lens` wrote for an MLP run."""
    c = store.read_json(Path(directory) / "config.json")
    module = ExportedMLP(c["p"], c["d_embed"], c["hidden"], **{k: c.get(k, v) for k, v in STUDY_MLP.items()})
    module.load_state_dict(torch.load(Path(directory) / "state_dict.pt", weights_only=True))
    return module


class ExportedMLP(torch.nn.Module):
    """fastgrok's MLP as a plain module, parameters named as fastgrok's: the study's (E, W1, W2, b1, b2),
    logits = GeLU([E[a], E[b]] W1 + b1) W2 + b2, or the peers' (config.STUDY_MLP's fields: mlp_input
    onehot drops E and W1 takes 2p inputs, mlp_layers hidden layers W1 .. WL, mlp_act, mlp_bias).
    forward(tokens (N, 2) of a, b) -> (N, p)."""

    def __init__(self, p: int, d_embed: int, hidden: int, mlp_input: str = "embed", mlp_layers: int = 1,
                 mlp_act: str = "gelu", mlp_bias: bool = True):
        super().__init__()
        self.p, self.onehot, self.layers = p, mlp_input == "onehot", mlp_layers
        self.act = F.relu if mlp_act == "relu" else F.gelu
        if not self.onehot:
            self.E = torch.nn.Parameter(torch.zeros(p, d_embed))
        widths = [2 * p if self.onehot else 2 * d_embed] + [hidden] * mlp_layers + [p]
        for i in range(mlp_layers + 1):
            setattr(self, f"W{i + 1}", torch.nn.Parameter(torch.zeros(widths[i], widths[i + 1])))
        for i in range(mlp_layers + 1) if mlp_bias else ():
            setattr(self, f"b{i + 1}", torch.nn.Parameter(torch.zeros(widths[i + 1])))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.onehot:                                              # (N, 2p): one-hot of a, then of b
            x = torch.cat([F.one_hot(tokens[:, 0], self.p), F.one_hot(tokens[:, 1], self.p)], -1).to(self.W1.dtype)
        else:
            x = self.E[tokens].flatten(-2)                           # (N, 2 d_embed)
        for i in range(1, self.layers + 2):
            x = (self.act(x) if i > 1 else x) @ getattr(self, f"W{i}")
            if hasattr(self, f"b{i}"):
                x = x + getattr(self, f"b{i}")
        return x
