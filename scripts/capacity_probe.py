"""Can GFA's grid hold LoRA's solution? The capacity half of docs/study.md's "speed or capacity" question.

A trained LoRA adapter's update, concatenated in GFA's module order and viewed m x k, is cut to its best rank-r
approximation (truncated SVD, the unused padding entries left free; r the GFA run's rank at the same budget) and
scattered back into the modules: the closest update GFA's grid can express at that budget. The training loss of the base model with each update (none,
LoRA's, its projection, and GFA's own trained update) is measured on a fixed sample of the LoRA run's training
examples, with the training loss's own terms (the answer tokens' log-likelihoods), averaged over all answer tokens
of the sample. If the projection's loss is close to LoRA's, GFA's grid holds a solution as good as LoRA's and a
higher GFA loss is the optimiser's; if it is far above, LoRA's solution is out of the grid's reach.

    python scripts/capacity_probe.py LORA_RUN GFA_RUN [--examples N] [--json FILE]

Both runs are finished multiple-choice `gfa train` folders of one model and targets, with their adapters beside
their records (`adapter/`); the sample is drawn with a fixed seed from LORA_RUN's training split.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from gfa_peft.cli import quiet_libraries
from gfa_peft.io.files import write_json_atomic

with quiet_libraries():  # importing PEFT logs bitsandbytes' note on an optional kernel; the gfa commands hide it too
    from gfa_peft.adapters.saved import load_saved_adapter
    from gfa_peft.analysis.lens.inputs import deltas_from_adapter
    from gfa_peft.analysis.lens.report import global_matrix
    from gfa_peft.layout import Layout
    from gfa_peft.training.config import RunConfig
    from gfa_peft.training.evaluation import answer_log_likelihoods
    from gfa_peft.training.run import (CONFIG_FILE, PreparedRun, _model_class, _tokenizer, _training_examples,
                                       prepare)

ADAPTER_FOLDER = "adapter"


def best_grid_approximation(deltas: Mapping[str, Tensor], layout: Layout, rank: int,
                            max_iterations: int = 100, rtol: float = 1e-6) -> dict[str, Tensor]:
    """The module updates of the rank-`rank` m x k matrix closest to the deltas on the entries the modules use.

    Without padding this is the truncated SVD (Eckart-Young). GFA never reads its padding entries, so they are free:
    each round fills them with the last approximation's values and takes the truncated SVD again (hard impute),
    which never raises the error on the used entries; rounds stop when it falls by less than `rtol` of itself.
    """
    grid = global_matrix(deltas, layout).double()
    padding = grid.view(-1)[layout.d :]  # zero to begin with, as global_matrix pads
    error = float("inf")
    for _ in range(max_iterations):
        left, values, right = torch.linalg.svd(grid, full_matrices=False)
        approximation = (left[:, :rank] * values[:rank]) @ right[:rank]
        previous, error = error, float((grid - approximation).view(-1)[: layout.d].square().sum())
        padding.copy_(approximation.view(-1)[layout.d :])
        if not layout.padding or previous - error < rtol * error:
            break
    flat = approximation.reshape(-1)
    return {piece.name: flat[piece.offset : piece.end].view(piece.shape).float() for piece in layout.modules}


def relative_error(deltas: Mapping[str, Tensor], approximation: Mapping[str, Tensor]) -> float:
    """||Delta - approximation||^2 / ||Delta||^2 over all modules."""
    gap = sum(float((deltas[name].double() - approximation[name].double()).square().sum()) for name in deltas)
    return gap / sum(float(delta.double().square().sum()) for delta in deltas.values())


@torch.no_grad()
def answer_loss(model: nn.Module, batches: list[dict]) -> float:
    """Minus the mean log-likelihood of every answer token in the batches."""
    total, count = 0.0, 0
    for batch in batches:
        log_likelihoods = answer_log_likelihoods(model, model.get_output_embeddings(), **batch)
        total, count = total - float(log_likelihoods.sum()), count + len(log_likelihoods)
    return total / count


@torch.no_grad()
def loss_with(model: nn.Module, deltas: Mapping[str, Tensor], batches: list[dict]) -> float:
    """The answer loss with W_i + Delta_i in every module of `deltas`; the weights are restored after."""
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in deltas}
    try:
        for name, delta in deltas.items():
            model.get_submodule(name).weight.add_(delta)
        return answer_loss(model, batches)
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight.copy_(weight)


def prepared_run(folder: Path) -> PreparedRun:
    """A finished run's settings resolved again as `gfa train` resolved them (task, split, tokenisation, batch)."""
    record = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    return prepare(RunConfig(**{**record["config"], "lr": record["resolved"]["lr"]}))


def sample_batches(run: PreparedRun, count: int) -> list[dict]:
    """`count` of the run's training examples, drawn with a fixed seed, collated in batches of the run's size."""
    examples, collate = _training_examples(run, _tokenizer(run.model_dir))
    if not 0 < count <= len(examples):
        raise SystemExit(f"--examples must be between 1 and the run's {len(examples)} training examples")
    sample = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:count].tolist()
    return [collate([examples[index] for index in sample[start : start + run.batch_size]])
            for start in range(0, count, run.batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora_run", type=Path, help="a finished LoRA `gfa train` run folder (its adapter beside it)")
    parser.add_argument("gfa_run", type=Path, help="a finished GFA run folder at the same budget, model and targets")
    parser.add_argument("--examples", type=int, default=256, help="training examples in the sample (default: 256)")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args()
    run = prepared_run(args.lora_run)
    if run.kind != "multiple_choice":
        raise SystemExit(f"{args.lora_run} is a {run.kind} run: the probe measures the answer loss of multiple choice")
    saved = load_saved_adapter(args.gfa_run / ADAPTER_FOLDER)
    rank = saved.A.shape[0]
    lora = deltas_from_adapter(args.lora_run / ADAPTER_FOLDER, run.model_dir)
    gfa = deltas_from_adapter(args.gfa_run / ADAPTER_FOLDER, run.model_dir)
    projected = best_grid_approximation(lora, saved.layout, rank)

    batches = sample_batches(run, args.examples)
    model = _model_class(run.kind).from_pretrained(run.model_dir, dtype=torch.float32).eval()

    result = {
        "lora_run": str(args.lora_run),
        "gfa_run": str(args.gfa_run),
        "gfa_rank": rank,
        "examples": args.examples,
        "relative_error": relative_error(lora, projected),
        "loss": {
            "base": answer_loss(model, batches),
            "lora": loss_with(model, lora, batches),
            "lora_on_gfa_grid": loss_with(model, projected, batches),
            "gfa": loss_with(model, gfa, batches),
        },
    }
    print(json.dumps(result), flush=True)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    with quiet_libraries():  # transformers' load reports, as under `gfa train`
        main()
