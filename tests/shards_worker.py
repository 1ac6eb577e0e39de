"""Run under torchrun by test_shards.py: each process iterates the train split of a shard set for two
epochs and writes rank{R}.json: the images it saw and its steps per epoch, and its shards."""

import json
import sys
from pathlib import Path

from mdn_cli.data.shards import ShardSource
from mdn_cli.distributed import init_distributed, shutdown

shards, out = sys.argv[1], Path(sys.argv[2])
d = init_distributed("cpu")
source = ShardSource(shards, {"on_bad_image": "error", "shuffle_buffer": 8})
train = [e for e in source.read().examples if e.split == "train"]
loader = source.loader(train, 16, 4, 1, train=True, seed=3, rank=d.rank, world_size=d.world_size)
keys, steps = [], []
for epoch in range(2):
    loader.set_epoch(epoch)
    seen, n = [], 0
    for batch in loader:
        seen += [train[i].image for i in batch.indices.tolist()]
        n += 1
    assert n == len(loader), (n, len(loader))
    keys.append(seen)
    steps.append(n)
mine = sorted(loader.stream.mine(1))
loader.close()
(out / f"rank{d.rank}.json").write_text(json.dumps({"keys": keys, "steps": steps, "shards": mine}))
shutdown(d)
