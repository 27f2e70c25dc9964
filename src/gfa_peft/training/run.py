"""One fine-tuning run: a model, a task and a method at a budget, trained with transformers' Trainer and
evaluated, written to a run folder.

`prepare(config)` checks everything that can be checked without training (model, task, method, anchor,
leakage, user files) and raises `RunConfigError` naming the problem, before anything is written.
`execute(run, folder)` trains and evaluates. The run folder holds

- `config.json`: the RunConfig and everything resolved from it (targets, placement, recipe, versions);
- `adapter/` (a PEFT adapter folder) or, for full fine-tuning, `model/` (the whole tuned model with its
  tokenizer, so base and tuned weights can be diffed, e.g. by `gfa lens --base ... --tuned ...`); a zero-shot run,
  which trains nothing, saves no weights and has an empty training log;
- `train_log.json`: the Trainer's log (loss and learning rate every `LOG_EVERY` steps);
- `metrics.json`, written last: a run folder whose metrics parse is finished.

The folder is written by io/files.py's rule: built in a temporary sibling and renamed into place when complete,
never over a folder of other files or one holding the run's inputs, and by one process at a time.

Under `torchrun` the processes share each global batch (the Trainer runs DDP) and the evaluation split;
only the main process writes. docs/distributed.md tells what is checked and verified.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from peft import get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    ProgressCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as transformers_logging

import gfa_peft
from gfa_peft.data.assets import model_path
from gfa_peft.data.cache import MissingAssetError, cache_dir
from gfa_peft.io.files import ResultKind, check_output_folder, output_folder, read_json_object, write_json_atomic
from gfa_peft.adapters.distributed import (
    GlobalBatchTrainer,
    accelerator_available,
    check_ranks_agree,
    gather_in_rank_order,
    launched_rank,
    launched_world_size,
    per_rank_batch,
    shard_for_rank,
)
from gfa_peft.data.encoding import encode_choice_training, encode_classification
from gfa_peft.training.evaluation import (
    SCORING_VERSIONS,
    answer_log_likelihoods,
    majority_label,
    predict_choices,
    predict_classes,
    task_metrics,
)
from gfa_peft.training.methods import (
    METHOD_SETTINGS,
    UNANCHORED,
    ZERO_SHOT,
    Placement,
    UnreachableAnchor,
    check_method_settings,
    peft_config,
    place,
    scale_rule_of,
)
from gfa_peft.tuner.gradient_init import init_from_gradient
from gfa_peft.training.config import RunConfig, RunConfigError, check_named_choices, flag
from gfa_peft.training.recipes import RECIPES, default_learning_rate, recipe_key
from gfa_peft.data.splits import carve
from gfa_peft.data.tasks import Task, check_no_leakage, load_task, load_user_task, member_rows
from gfa_peft.layout import parse_module_order
from gfa_peft.targets import default_targets, find_targets, target_shapes

BUNDLED_MODELS = ("minilm", "smollm2")
HEAD_NAMES = ("classifier", "score")
"""The classification heads of transformers' sequence classifiers (PEFT adds these to modules_to_save)."""
LOG_EVERY = 10
# Batches of similar lengths (less padding, the same examples per epoch); the option's name changed in transformers 5.
_LENGTH_GROUPED = ({"train_sampling_strategy": "group_by_length"}
                   if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else {"group_by_length": True})
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
RUN_FILES = {CONFIG_FILE, "adapter", "model", "train_log.json", METRICS_FILE}
"""Everything a run folder may hold: a folder with anything else is not a run's, and is never replaced."""
RUN_RECORD_PARTS = ("config", "resolved")
"""The entries of a run's config.json (`run_record`), which a model's config.json lacks."""


@dataclass
class PreparedRun:
    """A RunConfig checked and resolved: everything `execute` needs except the weights."""

    config: RunConfig
    task: Task
    data: DatasetDict
    eval_task: Task
    eval_data: Dataset
    model_dir: Path
    recipe: str
    targets: str | list[str]
    placement: Placement
    steps: int | None
    epochs: float | None
    lr: float
    batch_size: int
    max_length: int
    warmup_ratio: float
    eval_batch_size: int

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def scale_rule(self) -> str:
        """The scale rule the run trains under (`methods.scale_rule_of`: "auto" is the method's own)."""
        return scale_rule_of(self.config.method, self.config.scale_rule)

    @property
    def name(self) -> str:
        """The run folder's name: method, size, seed, and what differs from a default run."""
        parts = [self.config.method] + ([self.placement.label] if self.config.method not in UNANCHORED else [])
        parts.append(f"s{self.config.seed}")
        if self.config.module_order is not None:
            parts.append(f"order-{self.config.module_order}")
        if self.config.grid != "square":
            parts.append(f"grid-{self.config.grid}")
        if self.config.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.config.eval_task is not None:
            parts.append(f"on-{self.eval_task.name}")
        if self.config.eval_split != "test":
            parts.append(self.config.eval_split)
        if self.config.dtype != "float32":
            parts.append(self.config.dtype)
        if self.config.choice_score != "sum":
            parts.append(self.config.choice_score)
        if self.scale_rule != "constant":
            parts.append(self.scale_rule)
        if self.config.b_lr_ratio != 1:
            parts.append(f"blr{self.config.b_lr_ratio:g}")
        if self.config.gradient_init:
            parts.append(f"ginit{self.config.gradient_init}")
        if self.config.module_gain:
            parts.append("gain")
        return "-".join(parts)

    @property
    def inputs(self) -> list[Path]:
        """What the run reads: its output folder may not hold any of them."""
        files = [Path(path) for path in (self.config.train_file, self.config.eval_file) if path is not None]
        return [self.model_dir, self.cache, *files]

    @property
    def cache(self) -> Path:
        return Path(self.config.cache) if self.config.cache else cache_dir()

    def recorded_model_dir(self) -> str:
        """The model folder as config.json records it: a bundled model's relative to the asset cache
        ("models/minilm", the same on every machine), a user's folder as given."""
        try:
            return str(self.model_dir.resolve().relative_to(self.cache.resolve()))
        except ValueError:
            return str(self.model_dir)

    def resolved(self) -> dict[str, Any]:
        """What config.json records beside the RunConfig."""
        return {
            "task": self.task.name, "task_kind": self.kind, "eval_task": self.eval_task.name,
            "eval_examples": self.eval_data.num_rows, "model_dir": self.recorded_model_dir(), "recipe": self.recipe,
            "targets": self.targets, "placement": asdict(self.placement), "steps": self.steps,
            "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "max_length": self.max_length,
            "warmup_ratio": self.warmup_ratio, "eval_batch_size": self.eval_batch_size,
            "scoring": SCORING_VERSIONS[self.kind], "versions": _versions(),
        }


def prepare(config: RunConfig) -> PreparedRun:
    """Check and resolve `config` without loading weights; raises RunConfigError naming the problem."""
    try:
        return _prepare(config)
    except (ValueError, TypeError, MissingAssetError) as error:
        raise RunConfigError(str(error), unreachable=isinstance(error, UnreachableAnchor)) from None


def _prepare(config: RunConfig) -> PreparedRun:
    check_named_choices(config)
    _check_positive(config)
    _check_method_settings(config)
    cache = Path(config.cache) if config.cache else None
    task, data = _load_training_task(config, cache)
    eval_task, eval_data = _evaluation_split(config, task, data, cache)
    model_dir = _model_dir(config.model, cache)
    skeleton = _skeleton(model_dir, task.kind)
    targets = config.targets or default_targets(skeleton)
    targets = targets if isinstance(targets, str) else list(targets)
    module_order = None if config.module_order is None else parse_module_order(config.module_order)
    placement = place(config.method, target_shapes(skeleton, targets), config.anchor, config.rank, module_order,
                      config.grid, config.module_gain)
    trains = config.method != ZERO_SHOT
    if config.choice_score != "sum" and task.kind != "multiple_choice":
        raise ValueError(f"--choice-score {config.choice_score} scores the choices of multiple-choice tasks; "
                         f"{task.name!r} is a classification task")
    if not trains and task.kind != "multiple_choice":
        raise ValueError(f"zero-shot scores multiple-choice tasks with the pretrained language model; {task.name!r} "
                         "is a classification task, whose head would be untrained")
    if config.steps is not None and config.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if config.warmup_ratio is not None and not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    key = recipe_key(config.model, task.kind)
    recipe = RECIPES[key]
    batch_size = config.batch_size or recipe.batch_size
    per_rank_batch(batch_size, launched_world_size())  # raises on every rank when the processes cannot share it
    scale_rule = scale_rule_of(config.method, config.scale_rule)
    lr = (0.0 if not trains else config.lr if config.lr is not None
          else default_learning_rate(key, config.method, config.anchor, scale_rule))
    return PreparedRun(
        config=config, task=task, data=data, eval_task=eval_task, eval_data=eval_data, model_dir=model_dir,
        recipe=key, targets=targets, placement=placement,
        steps=0 if not trains else None if config.epochs is not None else config.steps or recipe.steps,
        epochs=config.epochs if trains else None,
        lr=lr,
        batch_size=batch_size, max_length=config.max_length or recipe.max_length,
        warmup_ratio=recipe.warmup_ratio if config.warmup_ratio is None else config.warmup_ratio,
        eval_batch_size=config.eval_batch_size or recipe.eval_batch_size,
    )


def _load_training_task(config: RunConfig, cache: Path | None) -> tuple[Task, DatasetDict]:
    if (config.task is None) == (config.train_file is None):
        raise ValueError("give a task (--task) or your own data (--train-file), not both or neither")
    if config.train_file is None:
        if config.eval_file is not None:
            raise ValueError("--eval-file goes with --train-file")
        task, data = load_task(config.task, cache)
    else:
        task, data = load_user_task(config.train_file, config.eval_file)
    if task.test_only or not data["train"].num_rows:
        raise ValueError(f"task {task.name!r} has no training split (it is a test-only task)")
    if config.max_train_examples is not None:
        data = DatasetDict({**data, "train": _per_task_subset(task, data["train"], config.max_train_examples,
                                                              "max_train_examples")})
    return task, data


def _evaluation_split(config: RunConfig, task: Task, data: DatasetDict, cache: Path | None) -> tuple[Task, Dataset]:
    eval_task, eval_data = task, data
    if config.eval_task is not None:
        eval_task, eval_data = load_task(config.eval_task, cache)
        check_no_leakage(task.name, eval_task)
        if (eval_task.kind, eval_task.label_names) != (task.kind, task.label_names):
            raise ValueError(f"task {eval_task.name!r} has other labels than {task.name!r}: "
                             f"{list(eval_task.label_names)} vs {list(task.label_names)}")
    split = eval_data[config.eval_split]
    if not split.num_rows:
        raise ValueError(f"task {eval_task.name!r} has no {config.eval_split} split")
    if config.max_eval_examples is not None:
        split = _per_task_subset(eval_task, split, config.max_eval_examples, "max_eval_examples")
    return eval_task, split


def _per_task_subset(task: Task, split: Dataset, size: int, setting: str) -> Dataset:
    """`_fixed_subset_rows`' `size` examples of each of the task's members (of the task itself when it is not a
    mixture), in the split's order."""
    if size < 1:
        raise ValueError(f"{flag(setting)} must be positive, got {size}")
    kept = []
    for rows in member_rows(task, split).values():
        member = split.select(rows)
        kept += [rows[index] for index in _fixed_subset_rows(member, size)]
    return split.select(sorted(kept))


def _fixed_subset_rows(split: Dataset, size: int) -> list[int]:
    """The rows of `size` examples chosen by the hash of their ids (as splits are), so every run sees the same
    ones; every row when the split is no larger."""
    if size >= split.num_rows:
        return list(range(split.num_rows))
    rows = [{"id": identifier, "index": index} for index, identifier in enumerate(split["id"])]
    kept = carve(rows, {"kept": size / split.num_rows, "rest": 1 - size / split.num_rows})["kept"]
    return sorted(row["index"] for row in kept)


def _model_dir(model: str, cache: Path | None) -> Path:
    if model in BUNDLED_MODELS:
        return model_path(model, cache)
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {model!r} is not one of {', '.join(BUNDLED_MODELS)} nor a folder with config.json")
    return folder


def _skeleton(model_dir: Path, kind: str) -> nn.Module:
    """The model `execute` will build, on the meta device (no weights), to find the targets and their shapes."""
    config = AutoConfig.from_pretrained(model_dir)
    if kind == "multiple_choice" and not any(name.endswith("ForCausalLM") for name in config.architectures or []):
        raise ValueError(f"multiple-choice tasks are scored by a causal LM; {model_dir} is a "
                         f"{config.model_type} model with architectures {config.architectures}")
    with torch.device("meta"):
        return _model_class(kind).from_config(config)


def _model_class(kind: str) -> type:
    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


_RUN_DEFAULTS = {name: getattr(RunConfig(), name) for name in METHOD_SETTINGS}


def _check_method_settings(config: RunConfig) -> None:
    """Refuse a setting the run's method does not have (it would be recorded but change nothing)."""
    if not config.b_lr_ratio > 0:
        raise ValueError(f"--b-lr-ratio must be positive, got {config.b_lr_ratio}")
    if config.gradient_init < 0:
        raise ValueError(f"--gradient-init must be 0 or a number of batches, got {config.gradient_init}")
    check_method_settings(config.method, [name for name in METHOD_SETTINGS
                                          if getattr(config, name) != _RUN_DEFAULTS[name]])


def _check_positive(config: RunConfig) -> None:
    for name in ("steps", "epochs", "lr", "batch_size", "max_length", "eval_batch_size"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{flag(name)} must be positive, got {value}")


# ---------------------------------------------------------------- execution

class LossBar(ProgressCallback):
    """The Trainer's progress bar (steps, rate, ETA) with the latest loss on it instead of printed log lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")


class AnswerLossTrainer(GlobalBatchTrainer):
    """The Trainer of multiple-choice runs: the causal-LM loss of the answer tokens, with the LM head run at the
    positions that predict them only. transformers' loss runs it at every position (SmolLM2's head has 49,152
    outputs, a fifth of the model's work per position) and then ignores all but the answer's few."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_likelihoods = answer_log_likelihoods(model, self.model.get_output_embeddings(), **inputs)
        # As transformers' causal-LM loss: summed over the answer tokens and divided by their number in the
        # (global, accumulated) batch, which the Trainer counts; scaled back up by the processes it averages over.
        loss = -log_likelihoods.sum() / (len(log_likelihoods) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


def train(config: RunConfig, folder: str | Path, progress: bool = True) -> dict[str, Any]:
    """Prepare, train and evaluate one run into `folder`; returns its metrics."""
    return execute(prepare(config), Path(folder), progress)


def execute(run: PreparedRun, folder: Path, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate a prepared run; writes the run folder (main process only) and returns the metrics.

    The folder appears when the run is complete. It may be absent, empty or an unfinished run; a finished run
    is replaced (once the new one is complete) only with `overwrite`. Anything else raises OutputRefused
    before training, as does a folder another process is writing.
    """
    writes = launched_rank() == 0
    with output_folder(folder, RUN, overwrite, run.inputs) if writes else nullcontext() as building:
        return _execute(run, building, folder, progress)


def check_run_folder(run: PreparedRun, folder: Path, overwrite: bool = False) -> None:
    """Raise OutputRefused unless `execute` may write `folder` (checked before any training)."""
    check_output_folder(folder, RUN, overwrite, run.inputs)


def _execute(run: PreparedRun, folder: Path | None, destination: Path, progress: bool) -> dict[str, Any]:
    """Train, evaluate and (on the main process, `folder` given) write the run's files into `folder`, the
    temporary folder that becomes `destination`."""
    started = time.perf_counter()
    set_seed(run.config.seed)
    with _library_bars(shown=progress):
        tokenizer = _tokenizer(run.model_dir)
        model = _build_model(run, tokenizer)
    adapter_params, trainable_params = _trainable_counts(model, run)
    if adapter_params != run.placement.trainable:  # the budget arithmetic and the built model must agree
        raise RuntimeError(f"{run.config.method} has {adapter_params:,} adapter parameters, "
                           f"budget.py promised {run.placement.trainable:,}")
    check_ranks_agree(model, asdict(run.config))  # the same flags and GFA layout on every rank, or all stop here
    if folder is not None:
        write_json_atomic(folder / CONFIG_FILE, run_record(run))
    trained = time.perf_counter()
    if run.config.method == ZERO_SHOT:
        steps, train_loss, log_history, writes = 0, None, [], launched_rank() == 0
    else:
        trainer, result = _train(run, model, tokenizer, folder or destination, progress)
        model, writes = trainer.model, trainer.is_world_process_zero()
        steps, train_loss, log_history = result.global_step, result.training_loss, trainer.state.log_history
    train_seconds = time.perf_counter() - trained

    evaluated = time.perf_counter()
    with _evaluation_autocast(run, model):
        predictions, labels = _predict(run, model, tokenizer, progress and writes)
    eval_seconds = time.perf_counter() - evaluated
    metrics = {
        "task": run.task.name, "eval_task": run.eval_task.name, "eval_split": run.config.eval_split,
        "eval_examples": len(labels), "model": run.config.model, "method": run.config.method,
        "anchor": run.placement.anchor, "knobs": run.placement.knobs, "seed": run.config.seed, "lr": run.lr,
        **_scores(run, predictions, labels),
        "adapter_params": adapter_params, "trainable_params": trainable_params, "budget": run.placement.budget,
        "steps": steps, "train_loss": train_loss, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
    }
    if folder is not None:
        _save_weights(run, model, tokenizer, folder)
        write_json_atomic(folder / "train_log.json", log_history)
        metrics["wall_seconds"] = time.perf_counter() - started
        write_json_atomic(folder / METRICS_FILE, metrics)  # last
    metrics.setdefault("wall_seconds", time.perf_counter() - started)
    return metrics


def _train(run: PreparedRun, model: nn.Module, tokenizer: PreTrainedTokenizerBase, output_dir: Path,
           progress: bool) -> tuple[GlobalBatchTrainer, TrainOutput]:
    """Train `model` as the run asks; returns the trainer (its model and log) and what `train` returned."""
    examples, collate = _training_examples(run, tokenizer)
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=run.steps or -1, num_train_epochs=run.epochs or 1.0,
        learning_rate=run.lr, per_device_train_batch_size=per_rank_batch(run.batch_size, launched_world_size()),
        warmup_steps=run.warmup_ratio,
        weight_decay=run.config.weight_decay,
        lr_scheduler_type="linear", logging_steps=LOG_EVERY, save_strategy="no", report_to="none",
        seed=run.config.seed, data_seed=run.config.seed, remove_unused_columns=False, disable_tqdm=not progress,
        **_LENGTH_GROUPED,
        # On a CPU-only machine transformers joins torchrun's processes into one DDP job only with use_cpu;
        # without it each process trains alone. A classifier's loss is a per-example mean that ignores the
        # global token count, so transformers must not rescale it by the number of processes.
        use_cpu=not accelerator_available(), average_tokens_across_devices=run.kind != "classification",
        bf16=run.config.dtype == "bfloat16",
    )
    if arguments.world_size != launched_world_size():
        raise RuntimeError(f"{launched_world_size()} processes were launched but transformers trains with "
                           f"{arguments.world_size}: the processes would train unsynchronised copies")
    trainer_class = GlobalBatchTrainer if run.kind == "classification" else AnswerLossTrainer
    trainer = trainer_class(model=model, args=arguments, train_dataset=examples, data_collator=collate)
    if run.config.b_lr_ratio != 1:
        trainer.optimizer = _optimizer_with_b_rate(trainer, run.config.b_lr_ratio)
    if run.config.gradient_init:
        _init_from_first_batches(trainer, run.config.gradient_init)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossBar)
    else:  # no bar, and no log lines printed in its place either: the log is in train_log.json
        trainer.remove_callback(PrinterCallback)
    return trainer, trainer.train()


def _optimizer_with_b_rate(trainer: GlobalBatchTrainer, ratio: float) -> torch.optim.Optimizer:
    """The optimizer the Trainer would create, with the B factors (`gfa_B`, `lora_B`) at `ratio` times the rate
    (LoRA+); their share of the schedule is the same, since the scheduler scales every group's rate alike."""
    model, args = trainer.model, trainer.args
    decays = set(trainer.get_decay_parameter_names(model))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_b = ".gfa_B." in name or ".lora_B." in name
            groups.setdefault((is_b, name in decays), []).append(parameter)
    optimizer_class, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_class([{"params": parameters, "lr": args.learning_rate * (ratio if is_b else 1),
                             "weight_decay": args.weight_decay if decays_here else 0.0}
                            for (is_b, decays_here), parameters in groups.items()], **optimizer_kwargs)


def _init_from_first_batches(trainer: GlobalBatchTrainer, batches: int) -> None:
    """GFA's gradient-informed start (`gfa_peft.tuner.gradient_init`) from the first `batches` training batches,
    with dropout off (every pass must see the same gradient) and the random streams of training untouched."""
    model = trainer.model
    with torch.random.fork_rng():
        loader = iter(trainer.get_train_dataloader())
        first = [trainer._prepare_inputs(next(loader)) for _ in range(batches)]

        def losses() -> Iterator[torch.Tensor]:
            for inputs in first:
                yield trainer.compute_loss(model, dict(inputs)) / len(first)

        model.eval()
        try:
            init_from_gradient(model.base_model, losses)
        finally:
            model.train()


@contextmanager
def _library_bars(shown: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") follow the run's: hidden while it loads, when the run
    shows none, and as the caller had them afterwards."""
    if shown or not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _scores(run: PreparedRun, predictions: list[int], labels: list[int]) -> dict[str, Any]:
    """The task's metrics and majority-class baseline. A mixture's are the mean over its tasks (each task
    counting once, whatever its size), with each task's own, and its number of examples, under `by_task`."""
    evaluated = member_rows(run.eval_task, run.eval_data)
    trained = member_rows(run.task, run.data["train"])
    train_labels = list(run.data["train"]["label"])
    by_task = {}
    for member, rows in evaluated.items():
        # a single task, or a mixture evaluated on another one, has the baseline of all its training labels
        baseline_rows = trained.get(member, range(len(train_labels)))
        baseline = majority_label([train_labels[row] for row in baseline_rows])
        ours, truth = [predictions[row] for row in rows], [labels[row] for row in rows]
        by_task[member] = {**task_metrics(run.eval_task.metrics, ours, truth), "eval_examples": len(rows),
                           "majority_baseline": task_metrics(["accuracy"], [baseline] * len(rows), truth)["accuracy"]}
    if not run.eval_task.members:
        (single,) = by_task.values()
        return {name: value for name, value in single.items() if name != "eval_examples"}
    names = [*run.eval_task.metrics, "majority_baseline"]
    return {**{name: sum(scores[name] for scores in by_task.values()) / len(by_task) for name in names},
            "by_task": by_task}


def is_finished(folder: Path) -> bool:
    """Whether `folder` holds a finished run: its metrics file (written last) parses as a JSON object."""
    return read_json_object(folder / METRICS_FILE) is not None


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run, finished or not: the run record a run writes first (its config.json, told
    from a model's config.json by its content) and nothing a run does not write."""
    record = read_json_object(folder / CONFIG_FILE)
    return (record is not None and set(RUN_RECORD_PARTS) <= set(record)
            and {path.name for path in folder.iterdir()} <= RUN_FILES)


RUN = ResultKind("run", is_own=is_run_folder, is_finished=is_finished)


def _tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RunConfigError(f"the tokenizer of {model_dir} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _build_model(run: PreparedRun, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    extra = {"num_labels": len(run.task.label_names)} if run.kind == "classification" else {}
    model: PreTrainedModel = _model_class(run.kind).from_pretrained(run.model_dir, dtype=torch.float32, **extra)
    if model.config.pad_token_id is None:  # decoders classify from the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    if run.config.method == ZERO_SHOT:
        return model.requires_grad_(False)
    if run.config.method != "full":
        task_type = "SEQ_CLS" if run.kind == "classification" else "CAUSAL_LM"
        return get_peft_model(model, peft_config(run.placement.method, run.placement.knobs, run.targets, task_type,
                                                 scale_rule=run.scale_rule))
    model.requires_grad_(False)
    for _, module in find_targets(model, run.targets):
        module.weight.requires_grad_(True)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            module.requires_grad_(True)
    return model


def _trainable_counts(model: nn.Module, run: PreparedRun) -> tuple[int, int]:
    """(adapter-only, all) trainable parameters: the head, trained by every method, is not the adapter's."""
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    if run.config.method == "full":
        adapter = sum(module.weight.numel() for _, module in find_targets(model, run.targets))
    else:
        adapter = sum(parameter.numel() for name, parameter in trainable.items() if ".modules_to_save." not in name)
    return adapter, sum(parameter.numel() for parameter in trainable.values())


def _training_examples(run: PreparedRun, tokenizer: PreTrainedTokenizerBase) -> tuple[list[dict], Any]:
    if run.kind == "classification":
        examples = encode_classification(tokenizer, run.data["train"], run.task.text_columns, run.max_length)
        return examples, DataCollatorWithPadding(tokenizer)
    examples = encode_choice_training(tokenizer, run.data["train"], run.max_length)
    return examples, DataCollatorForSeq2Seq(tokenizer)


def _evaluation_autocast(run: PreparedRun, model: nn.Module) -> torch.autocast:
    """The precision a run is scored in: bfloat16 autocast for a `--dtype bfloat16` run (as it trained), else none."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.config.dtype == "bfloat16")


def _predict(run: PreparedRun, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
             progress: bool) -> tuple[list[int], list[int]]:
    """Predictions for the evaluation split; under torchrun each process predicts its own share."""
    labels = list(run.eval_data["label"])
    share = shard_for_rank(run.eval_data)
    device = next(model.parameters()).device
    if run.kind == "classification":
        examples = encode_classification(tokenizer, share, run.task.text_columns, run.max_length)
        pad = DataCollatorWithPadding(tokenizer)
        predictions = predict_classes(model, examples, lambda batch: pad(batch).to(device), run.eval_batch_size,
                                      progress)
        return gather_in_rank_order(predictions), labels
    predictions = predict_choices(model, tokenizer, share, run.config.choice_score, run.eval_batch_size, progress)
    return gather_in_rank_order(predictions), labels


def _save_weights(run: PreparedRun, model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    if run.config.method == ZERO_SHOT:
        return
    if run.config.method == "full":
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    else:
        model.save_pretrained(folder / "adapter")


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"gfa_peft": gfa_peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def run_record(run: PreparedRun) -> dict[str, Any]:
    """What config.json records: the RunConfig and everything resolved from it."""
    # the rule itself, not "auto": what "auto" means may change with GfaConfig's default, what the run did may not
    return {"config": {**asdict(run.config), "scale_rule": run.scale_rule}, "resolved": run.resolved()}


NOT_SETTINGS = {"config": ("cache",), "resolved": ("model_dir", "versions")}
"""Record entries that say where the inputs lay and which versions ran, not how the run trains."""
ADDED_LATER = {("config", "choice_score"): "sum", ("resolved", "scoring"): 1, ("config", "scale_rule"): "constant",
               ("config", "b_lr_ratio"): 1.0, ("config", "gradient_init"): 0, ("config", "grid"): "square",
               ("config", "module_gain"): False}
"""Settings that runs recorded before they existed ran with, by (record part, name): such a run still resumes."""


def changed_settings(run: PreparedRun, folder: Path) -> list[str]:
    """The settings (as "name: recorded -> now") in which the run recorded in `folder` differs from `run`;
    an unreadable record differs in everything."""
    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        recorded = {part: dict(recorded[part]) for part in NOT_SETTINGS}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return [f"{CONFIG_FILE}: unreadable"]
    current = json.loads(json.dumps(run_record(run)))  # as JSON reads it back: tuples are lists
    changes = []
    for part, ignored in NOT_SETTINGS.items():
        for name in sorted(set(recorded[part]) | set(current[part])):
            old, new = recorded[part].get(name, ADDED_LATER.get((part, name))), current[part].get(name)
            change = f"{name}: {json.dumps(old)} -> {json.dumps(new)}"
            if name not in ignored and old != new and change not in changes:  # steps are in both parts
                changes.append(change)
    return changes


def load_run(folder: Path) -> tuple[dict, dict]:
    """A finished run's (config record, metrics)."""
    return (json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")),
            json.loads((folder / METRICS_FILE).read_text(encoding="utf-8")))


FINAL_LOSS_LOGS = 5
"""The final training loss is the mean of the last this many logged losses (one every `LOG_EVERY` steps): one
batch's loss is too noisy to compare methods by."""


def final_train_loss(folder: Path) -> float | None:
    """The mean of the last `FINAL_LOSS_LOGS` training losses in a finished run's train_log.json; None for a run
    that logged none (zero-shot, or fewer steps than `LOG_EVERY`)."""
    log = json.loads((folder / "train_log.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in log if "loss" in entry][-FINAL_LOSS_LOGS:]
    return sum(losses) / len(losses) if losses else None

