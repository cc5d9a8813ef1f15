"""fastgrok's side of the peer reproductions: `python fg_run.py NAME 'JSON' [OUT]` trains TrainConfig(**JSON)
into OUT/NAME (default /work/authors/runs/fg/NAME). PRIETO (below) is Prieto et al.'s MLP and draw; the
commands that ran are in queues.sh and docs/fidelity.md."""
import json, sys, time
from fastgrok.config import TrainConfig
from fastgrok.train.trainer import train

PRIETO = {"p": 31, "lr": 0.01, "wd": 0.0, "mlp_input": "onehot", "mlp_layers": 2, "hidden": 200, "mlp_act": "relu",
          "mlp_bias": False, "init": "prieto", "compile": "off", "device": "cpu"}
"""Prieto et al.'s one-hot MLP (2 hidden ReLU layers of 200, no biases), their split and init per seed, their lr."""

if __name__ == "__main__":
    name, kw = sys.argv[1], json.loads(sys.argv[2])
    out = sys.argv[3] if len(sys.argv) > 3 else "/work/authors/runs/fg"
    cfg = TrainConfig(**{**(PRIETO if kw.pop("prieto", False) else {}), **kw})
    t = time.time()
    res = train(cfg, f"{out}/{name}", progress=False)
    print("WALL", time.time() - t)
    print(res.to_string())
