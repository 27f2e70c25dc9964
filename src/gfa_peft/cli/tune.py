"""`gfa tune`: choose each method's learning rate on the dev split, with the same trials for every method."""

from __future__ import annotations

import argparse
from pathlib import Path

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.sweep import add_grid_arguments, float_list, run_spec, spec_from_args
from gfa_peft.defaults import LR_CHOICE_RULES
from gfa_peft.io.files import write_json_atomic
from gfa_peft.io.tables import text_table
from gfa_peft.training.recipes import RECIPES, rate_entry, recipe_key, save_learning_rates


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help=COMMANDS["tune"],
        description=(
            "Train every method at one anchor for each learning rate of --lrs on each task, evaluate on the dev "
            "split (never the test split), and pick, per method (per method and anchor with --per-anchor), the rate "
            "with the best dev accuracy averaged over the tasks, or with --choose-by loss the one with the lowest "
            "final training loss among those within the tie band of the best dev accuracy (ties to the smaller "
            "rate). Writes OUT/lr_choice.json; --save-defaults also records the "
            "choices as your defaults for the recipe (default_lrs.json in the cache folder). Resumes like `gfa sweep`; "
            "more rates (or methods) tuned into the same OUT are pooled with its trials, and a chosen rate at the "
            "edge of those tried is pointed out."
        ),
    )
    add_grid_arguments(parser, anchors="4", exclude=("eval_split",))  # tuning always evaluates on the dev split
    parser.add_argument("--lrs", type=float_list, required=True, metavar="LR,LR,...",
                        help="the learning rates to try, the same for every method given")
    parser.add_argument("--per-anchor", action="store_true",
                        help="choose a rate for each anchor of --anchors, not one for all of them (a method whose "
                        "best rate changes with its size; --save-defaults then saves one rate per anchor)")
    parser.add_argument("--choose-by", choices=LR_CHOICE_RULES, default="dev",
                        help="dev: the best dev accuracy; loss: the lowest final training loss (mean of the last "
                        "five logged losses) among the rates whose dev accuracy is within the tie band of the best, "
                        "for dev splits too small to rank close rates (docs/study.md) (default: %(default)s)")
    parser.add_argument("--out", default="runs/tune", metavar="DIR", help="the tuning sweep's folder (default: %(default)s)")
    parser.add_argument("--save-defaults", action="store_true",
                        help="record the rates chosen for this command's methods as your defaults for the model's recipe "
                        "(under their --scale-rule; in default_lrs.json in the cache folder, $GFA_CACHE; they override "
                        "the shipped rates)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gfa_peft.data.tasks import MIXTURE_JOIN, TASKS  # datasets and torch load once tuning runs
    from gfa_peft.training.config import RunConfig
    from gfa_peft.training.methods import ZERO_SHOT, scale_rule_of
    from gfa_peft.training.sweep import choose_learning_rates

    spec = spec_from_args(args, eval_split="dev")
    if ZERO_SHOT in spec.methods:
        raise UsageError("zero-shot trains nothing: it has no learning rate to tune")
    names = [name for task in spec.tasks for name in task.split(MIXTURE_JOIN)]  # a mixture's tasks
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    kinds = {TASKS[name].kind for name in names}
    if len(kinds) > 1:
        raise UsageError("tune on tasks of one kind (all classification or all multiple choice): they share a recipe")
    out = Path(args.out)
    summary = run_spec(spec, out, progress=not args.no_progress, rerun_changed=args.rerun_changed)
    if summary["unfinished"]:  # the choice is made once, from every trial
        print(f"{len(summary['unfinished'])} trial(s) unfinished: the `gfa tune` that finishes the last of them "
              "chooses the rates (run this command again if none is under way)")
        return 0
    band = summary["tie_band"]["band_pp"]
    choices = choose_learning_rates(summary["cells"], per_anchor=args.per_anchor, rule=args.choose_by, band=band)
    key = recipe_key(spec.model, kinds.pop())
    record = {"recipe": key, "recipe_settings": RECIPES[key].__dict__, "spec": {**spec.__dict__},
              "rule": {"choose_by": args.choose_by, "per_anchor": args.per_anchor, "tie_band_pp": band},
              "choices": choices}
    write_json_atomic(out / "lr_choice.json", record)
    print(format_trials(summary["cells"], choices))
    for note in edge_notes(choices) + unshared_notes(choices):
        print(note)
    if args.save_defaults:  # this command's methods: their runs in OUT all had this command's settings
        tuned = {rate_entry(method, scale_rule_of(method, RunConfig(**spec.own_settings(method)).scale_rule)):
                 choices[method]["lr"] for method in spec.methods}
        path = save_learning_rates(key, tuned)
        print(f"saved {', '.join(tuned)} as the {key} recipe's defaults in {path}")
    return 0


def decisions(choices: dict[str, dict]) -> list[tuple[str, str | None, dict]]:
    """(method, anchor, choice) of every choice made: one per method, or with --per-anchor one per method and anchor
    (anchor None for a method's one choice)."""
    return [(method, anchor, sub) for method, choice in choices.items()
            for anchor, sub in (choice["by_anchor"].items() if "by_anchor" in choice else [(None, choice)])]


def edge_notes(choices: dict[str, dict]) -> list[str]:
    """A line for each choice of a rate that is the largest or smallest tried: its best rate may lie beyond."""
    notes = []
    for method, anchor, choice in decisions(choices):
        rates = sorted(choice["mean_by_lr"])
        if len(rates) > 1 and choice["lr"] in (rates[0], rates[-1]):
            largest = choice["lr"] == rates[-1]
            beyond = choice["lr"] * (3 if largest else 1 / 3)
            where, flags = ("", "") if anchor is None else (f" at anchor {anchor}", f" --anchors {anchor}")
            notes.append(f"{method}: {choice['lr']:g} is the {'largest' if largest else 'smallest'} rate tried"
                         f"{where}, so its best may lie beyond; to try {beyond:.1g}, run the same command with "
                         f"--methods {method}{flags} --lrs {beyond:.1g} (the trials of one folder are pooled)")
    return notes


def unshared_notes(choices: dict[str, dict]) -> list[str]:
    """A line for each choice whose rates were not all tried on the same cells: its mean column (and choice)
    covers only the cells every rate shares."""
    notes = []
    for method, anchor, choice in decisions(choices):
        if choice["cells_compared"] < choice["cells_tried"]:
            method = method if anchor is None else f"{method} at anchor {anchor}"
            notes.append(f"{method}: its rates were tried on different (task, anchor) cells; the mean and the choice "
                         f"use the {choice['cells_compared']} of {choice['cells_tried']} cells every rate was tried on"
                         + ("" if choice["cells_compared"] else " (none: each rate's own cells)"))
    return notes


def format_trials(cells: list[dict], choices: dict[str, dict]) -> str:
    """Every trial's dev accuracy (one row per method and rate, one column per task and anchor, the mean, the
    choice), then its final training loss laid out alike (mean of the last logged losses, over the seeds): a rate
    that fits better but generalises worse shows in the second table."""
    return (f"dev accuracy %\n{_trial_table(cells, choices, 'mean', '{:.1f}', with_choice=True)}\n"
            f"final training loss\n{_trial_table(cells, choices, 'final_loss', '{:.3f}', with_choice=False)}")


def _trial_table(cells: list[dict], choices: dict[str, dict], key: str, fmt: str, with_choice: bool) -> str:
    columns = list(dict.fromkeys((cell["task"], cell["anchor"]) for cell in cells))  # the summary's order: by size
    value_of = {(cell["method"], cell["lr"], cell["task"], cell["anchor"]): cell.get(key) for cell in cells}
    rows = []
    for method in choices:
        made = [(anchor, choice) for name, anchor, choice in decisions(choices) if name == method]
        for lr in sorted({lr for _, choice in made for lr in choice["mean_by_lr"]}):
            values = [value_of.get((method, lr, task, anchor)) for task, anchor in columns]
            shown = [value for value in values if value is not None]
            at = [anchor for anchor, choice in made if choice["lr"] == lr]
            mark = "" if not at else "chosen" if at == [None] else "chosen at " + ", ".join(at)
            # one choice per method: its mean over the cells every rate shares; per anchor: the row's own mean
            mean = made[0][1]["mean_by_lr"][lr] if made[0][0] is None else sum(shown) / len(shown)
            chosen = [f"{mean:.1f}", mark] if with_choice else []
            rows.append([method, f"{lr:g}", *("-" if value is None else fmt.format(value) for value in values), *chosen])
    header = ["method", "lr", *(f"{task} @{anchor}" for task, anchor in columns), *(["mean", ""] if with_choice else [])]
    return text_table(header, rows)
