"""Run by tests/test_validation.py under torchrun: the validation component of one network (seed 0) on every
rank of the gloo group; rank 0 writes OUT/scores.json and OUT/embeddings.npy."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from micon import distributed
from micon.data.shards import Manifest
from micon.models.image import ImageEncoder
from train.config import ValConfig
from train.validation import Validator

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
env = distributed.init(60.0)
torch.manual_seed(0)
manifest = Manifest.load(shards)
model = torch.nn.Module()
model.image_encoder = ImageEncoder("tiny", in_chans=len(manifest.channels), mode="multichannel")
trainer = SimpleNamespace(cfg=SimpleNamespace(val=ValConfig(every=1), micro_batch=4, data=SimpleNamespace(normalize="plate")),
                          manifest=manifest, rank=env.rank, world=env.world_size, out=out, device=torch.device("cpu"),
                          dtype=torch.float32, engine=SimpleNamespace(module=model), state=SimpleNamespace(validation={}))
validator = Validator(trainer)
scores = validator.run(1)
emb = validator.embed()
if env.rank == 0:
    (out / "scores.json").write_text(json.dumps(scores))
    np.save(out / "embeddings.npy", emb)
distributed.shutdown()
