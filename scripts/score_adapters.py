"""Score saved adapters (GFA, or the LoRA folders `gfa convert` writes) on a finished run's evaluation split.

No `gfa` command evaluates an existing adapter, so this script reuses `gfa train`'s own pieces: the run's recorded
settings are resolved again (`prepare`: the same task, split, tokenisation and batch size), the base model loads as
the run built it, each adapter loads onto a fresh copy with PEFT, and the run's evaluation scores it.

    python scripts/score_adapters.py RUN ADAPTER [ADAPTER ...] [--per-question]

prints one JSON line per adapter: its folder and the run's metrics (accuracy, ...), and with --per-question each
question's id, label and predicted answer (for paired comparisons of two adapters on the same questions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gfa_peft.cli import quiet_libraries

with quiet_libraries():  # importing PEFT logs bitsandbytes' note on an optional kernel; the gfa commands hide it too
    from peft import PeftModel

    from gfa_peft.training.config import RunConfig
    from gfa_peft.training.run import (CONFIG_FILE, _evaluation_autocast, _model_class, _predict, _scores, _tokenizer,
                                       prepare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `gfa train` run folder")
    parser.add_argument("adapters", type=Path, nargs="+", help="adapter folders for the run's base model")
    parser.add_argument("--per-question", action="store_true", help="also list every question's prediction")
    args = parser.parse_args()
    record = json.loads((args.run / CONFIG_FILE).read_text(encoding="utf-8"))
    # the rate the run trained at, not today's default for its settings: scoring needs none, and a rule's default may
    # not exist (a run at --scale-rule rsqrt without --lr under another version's rate table)
    run = prepare(RunConfig(**{**record["config"], "lr": record["resolved"]["lr"] or None}))  # zero-shot: 0
    tokenizer = _tokenizer(run.model_dir)
    extra = {"num_labels": len(run.task.label_names)} if run.kind == "classification" else {}
    for adapter in args.adapters:
        base = _model_class(run.kind).from_pretrained(run.model_dir, dtype=torch.float32, **extra)
        if base.config.pad_token_id is None:  # as the run set it: decoders classify from the last real token
            base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad(), _evaluation_autocast(run, model):
            predictions, labels = _predict(run, model, tokenizer, progress=False)
        scores = {"adapter": str(adapter), **_scores(run, predictions, labels)}
        if args.per_question:
            scores["questions"] = [{"id": identifier, "label": label, "predicted": predicted} for identifier, label,
                                   predicted in zip(run.eval_data["id"], labels, predictions, strict=True)]
        print(json.dumps(scores), flush=True)


if __name__ == "__main__":
    with quiet_libraries():  # transformers' load reports, as under `gfa train`
        main()
