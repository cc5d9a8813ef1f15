import json, sys, time
from fastgrok.config import TrainConfig
from fastgrok.train.trainer import train
name, kw = sys.argv[1], json.loads(sys.argv[2])
cfg = TrainConfig(**kw)
t = time.time()
res = train(cfg, f"/work/authors/runs/fg/{name}", progress=False)
print("WALL", time.time() - t)
print(res.to_string())
