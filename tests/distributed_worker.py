"""Run under torchrun by test_distributed.py: one copy per machine of the decoded-image cache and of
the frozen-backbone features. Prints one JSON line per process."""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from mdn_cli import features
from mdn_cli.data.cache import DecodedCache
from mdn_cli.data.folder import unlabelled
from mdn_cli.data.dataset import decode_square
from mdn_cli.distributed import init_distributed, shutdown
from mdn_cli.model import MDNRegressor, ModelArgs
from mdn_cli.runtime import Runtime

images = sorted(Path(sys.argv[1]).glob("*.png"))
d = init_distributed("cpu")

# The image cache: each process decodes only its own images, and then sees everyone's.
cache = DecodedCache("memory", len(images), 16, allocate=d.machine_tensor, name="test")
for i in range(d.rank, len(images), d.world_size):
    cache.get(i, images[i], 16)
d.barrier()
seen_all = bool(cache.filled.all()) and all(torch.equal(cache.images[i], decode_square(images[i], 16)) for i in range(len(images)))

# The feature cache: rows computed per process, every row present in every process.
computed = []
real_forward = features.BackboneFeatures.forward


def counting(self, x):
    computed.append(int(x.shape[0]))
    return real_forward(self, x)


features.BackboneFeatures.forward = counting
torch.manual_seed(0)
model = MDNRegressor(ModelArgs("resnet18", 2, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()
source, examples = unlabelled(images)
examples = [dataclasses.replace(e, target=float(i)) for i, e in enumerate(examples)]
table = features.cached_features(model, examples, source, Runtime(torch.device("cpu"), None), d, batch_size=4, num_workers=0,
                                 on_skip=print, name="test")
with torch.no_grad():
    expected = model.features(torch.stack([decode_square(p, 16) for p in images]))
print(json.dumps({
    "rank": d.rank,
    "cache_sees_all": seen_all,
    "cache_is_shared": cache.images.untyped_storage().filename is not None,
    "features_rows_computed": sum(computed),
    "features_rows": len(table),
    "features_error": float((table.features - expected).abs().max()),
}), flush=True)
shutdown(d)
