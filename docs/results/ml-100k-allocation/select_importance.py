"""Which ``importance`` weighting to keep: KL to dense on the ml-100k *validation* users (test users untouched).

    OMP_NUM_THREADS=1 [VARIANTS=alloc-kl,alloc-energy] python docs/results/ml-100k-allocation/select_importance.py \
        <dense model dir> <ratio> [...]

Compresses with odllm (uniform) and odllm_alloc at each importance with the calibration prompts compress.py uses
(seed 42, 1024 item-token prompts), then scores the teacher-forced KL(dense || compressed) at the positions that
predict the valid target's code tokens (the fidelity KL of metrics.json, on the validation users).
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

from odllm.compress.driver import compress_layers
from odllm.compress.pipeline import Calibration, calibration_batches, load_dense
from odllm.compress.registry import build_algorithm
from odllm.data.dataset import DatasetSource
from odllm.eval.protocol import fidelity

source = DatasetSource(name="ml-100k", format="atomic", dir=os.path.join(os.environ["ODLLM_DATA_DIR"], "ml-100k"))
dense, split = load_dense(Path(sys.argv[1]), source, 50)
batches = calibration_batches(dense.encoder, split, Calibration(), max_history=50, seed=42,
                              pad_id=dense.tokenizer.pad_token_id)
base = {"algorithm": "lowrank", "whiten": True, "align": "BA", "ridge": 1e-4}
variants = {"uniform": {"name": "odllm", **base}} | {
    f"alloc-{imp}": {"name": "odllm_alloc", **base, "allocation": "loss", "importance": imp}
    for imp in ("kl", "energy", "none")
}
if os.environ.get("VARIANTS"):  # e.g. VARIANTS=alloc-kl,alloc-energy
    variants = {k: v for k, v in variants.items() if k in os.environ["VARIANTS"].split(",")}
rows = []
for ratio in map(float, sys.argv[2:]):
    for label, method in variants.items():
        started = time.perf_counter()
        model = copy.deepcopy(dense.model)
        algorithm = build_algorithm(method, ratio)
        algorithm.allocate(model, batches)
        report = compress_layers(model, batches, algorithm, progress=False)
        seconds = time.perf_counter() - started
        empty = [[] for _ in split.valid]
        kl = fidelity(dense.model, model, dense.encoder, split.valid, empty, empty, template=0, batch_size=32,
                      pad_id=dense.tokenizer.pad_token_id)["kl"]
        params = sum(e["params_after"] for e in report["matrices"])
        rows.append({"ratio": ratio, "variant": label, "valid_kl": kl, "decoder_linear_params": params,
                     "compress_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
print(json.dumps(rows, indent=1))
