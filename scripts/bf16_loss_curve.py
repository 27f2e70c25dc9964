"""Does a bf16 training run's loss curve track its fp32 run as closely for GFA as for LoRA? (issue 23, item 3)

`gfa train --dtype bfloat16` runs autocast over float32 weights, which never holds a bf16 *base weight*; this script
trains the way most GPU users do: the whole model (base and head) cast to bf16, the adapter's factors in float32
(PEFT's autocast_adapter_dtype), plain AdamW, MiniLM on rt at anchor 4 with the recipe's batch and rate, the same
examples in the same order for every run.

    OMP_NUM_THREADS=1 python scripts/bf16_loss_curve.py train gfa bfloat16 200 curves/gfa-bfloat16.json
    python scripts/bf16_loss_curve.py compare curves/   # after the four runs (gfa, lora) x (float32, bfloat16)

`compare` prints, per method, the largest and mean gap between the bf16 and fp32 curves, each smoothed by a
moving average of 20 steps (one step's loss on 16 examples is noisy).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from gfa_peft.training import run as training
from gfa_peft.training.config import RunConfig

SMOOTHING = 20


def train(method: str, dtype_name: str, steps: int, out: Path) -> None:
    dtype = getattr(torch, dtype_name)
    prepared = training.prepare(RunConfig(model="minilm", task="rt", method=method, anchor="4"))
    torch.manual_seed(0)
    tokenizer = training._tokenizer(prepared.model_dir)
    model = training._build_model(prepared, tokenizer)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and "gfa_" not in name and "lora_" not in name:
            tensor.data = tensor.data.to(dtype)
    examples, collate = training._training_examples(prepared, tokenizer)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=prepared.lr, weight_decay=0.0)
    model.train()
    losses, started, batch = [], time.perf_counter(), prepared.batch_size
    for step in range(steps):
        rows = [order[(step * batch + i) % len(order)] for i in range(batch)]
        loss = model(**collate([examples[row] for row in rows])).loss
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    factor_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "gfa_" in n or "lora_" in n})
    out.write_text(json.dumps({"method": method, "dtype": dtype_name, "lr": prepared.lr, "batch": batch,
                               "factor_dtypes": factor_dtypes, "seconds": time.perf_counter() - started,
                               "losses": losses}))


def smoothed(losses: list[float]) -> list[float]:
    return [sum(losses[i - SMOOTHING:i]) / SMOOTHING for i in range(SMOOTHING, len(losses) + 1)]


def compare(folder: Path) -> None:
    for method in ("gfa", "lora"):
        curves = {dtype: smoothed(json.loads((folder / f"{method}-{dtype}.json").read_text())["losses"])
                  for dtype in ("float32", "bfloat16")}
        gaps = [abs(low - full) for low, full in zip(curves["bfloat16"], curves["float32"])]
        print(f"{method}: bf16 vs fp32, {SMOOTHING}-step moving average over {len(gaps) + SMOOTHING - 1} steps: "
              f"max gap {max(gaps):.4f}, mean gap {sum(gaps) / len(gaps):.4f}; final fp32 {curves['float32'][-1]:.4f}, "
              f"bf16 {curves['bfloat16'][-1]:.4f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"] and len(sys.argv) == 6:
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 3:
        compare(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
