"""Where in the network a trained adapter puts its update: ||Delta W_i||_F of every target module, for GFA and
LoRA adapters side by side (the evidence for the siqa question of docs/study.md).

A GFA module's update is its slice of s * B A (times its gain), formed one module at a time as `gfa inspect` forms
it; a LoRA module's is (alpha / r) * B_i A_i (alpha / sqrt(r) under rsLoRA), both read from the adapter alone. Any
other adapter PEFT loads (VeRA, VB-LoRA, DoRA, ...) is measured as merged minus base, given the base model's folder
(--base), as `gfa lens --adapter` reads it. For each adapter the script reports every module's norm and share of
the update's energy, and a concentration summary: the share of the energy in the quarter of the modules that hold
the most (a uniform spread gives 25%).

    python scripts/update_norms.py ADAPTER [ADAPTER ...] [--base MODEL_DIR] [--label NAME ...] [--json FILE]
        [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from gfa_peft.cli import quiet_libraries
from gfa_peft.io.files import write_json_atomic

with quiet_libraries():  # importing PEFT logs bitsandbytes' note on an optional kernel; the gfa commands hide it too
    from peft.utils import load_peft_weights

    from gfa_peft.adapters.saved import CONFIG_FILE, load_saved_adapter
    from gfa_peft.analysis.lens.inputs import deltas_from_adapter
    from gfa_peft.analysis.ranks import module_update

LAYER = re.compile(r"\.layers?\.(\d+)\.")  # Llama's model.layers.3., BERT's encoder.layer.3.


def gfa_norms(adapter: Path) -> dict[str, float]:
    saved = load_saved_adapter(adapter)
    return {piece.name: float(module_update(saved.B, saved.A, saved.layout, piece.name, saved.scale_of(piece)).norm())
            for piece in saved.layout.modules}


def lora_norms(adapter: Path, config: dict) -> dict[str, float]:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter}: rank/alpha patterns are not read here")
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    weights = load_peft_weights(str(adapter), device="cpu")
    norms = {}
    for key, down in weights.items():
        if key.endswith("lora_A.weight"):
            up = weights[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            norms[name] = scale * float((up.double() @ down.double()).norm())
    return norms


def merged_norms(adapter: Path, base: Path) -> dict[str, float]:
    """||W merged - W|| of each module the adapter adapts: any adapter PEFT loads onto `base` (`gfa lens`'s own
    merged-minus-base deltas)."""
    return {name: float(delta.double().norm()) for name, delta in deltas_from_adapter(adapter, base).items()}


def norms_of(adapter: Path, base: Path | None = None) -> dict[str, float]:
    config = json.loads((adapter / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("peft_type") == "GFA":
        return gfa_norms(adapter)
    if config.get("peft_type") == "LORA" and not config.get("use_dora"):
        return lora_norms(adapter, config)
    if base is None:
        raise ValueError(f"{adapter} holds a {config.get('peft_type')} adapter: give the base model's folder "
                         "(--base) to measure it merged minus base")
    return merged_norms(adapter, base)


def summary(norms: dict[str, float]) -> dict:
    energy = {name: norm**2 for name, norm in norms.items()}
    total = sum(energy.values())
    if not total:  # an adapter saved before training (B = 0) has no update whose shares could be given
        raise ValueError("the adapter's update is zero in every module (saved untrained?): no energy to share out")
    ranked = sorted(energy.values(), reverse=True)
    top_quarter = sum(ranked[: max(1, len(ranked) // 4)]) / total
    return {"total_norm": total**0.5, "top_quarter_energy_share": top_quarter,
            "modules": {name: {"norm": norms[name], "energy_share": energy[name] / total} for name in norms}}


def plot(reports: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({name.rsplit(".", 1)[-1] for report in reports.values() for name in report["modules"]})
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), sharey=True, squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for label, report in reports.items():
            points = sorted((int(layer.group(1)), 100 * module["energy_share"])
                            for name, module in report["modules"].items()
                            if name.endswith(kind) and (layer := LAYER.search(name)))
            axis.plot(*zip(*points), marker=".", label=label)
        axis.set(title=kind, xlabel="layer", ylabel="share of the update's energy (%)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", type=Path, nargs="+", help="saved adapter folders")
    parser.add_argument("--base", type=Path, metavar="MODEL_DIR",
                        help="the base model's folder, for adapters other than GFA and LoRA (merged minus base)")
    parser.add_argument("--label", action="append", metavar="NAME",
                        help="a name for each adapter, in order, one --label each (default: their folders)")
    parser.add_argument("--json", type=Path, help="write every module's norm and share to this file")
    parser.add_argument("--plot", type=Path, help="plot each layer's energy share per module kind (.png)")
    args = parser.parse_args()
    labels = args.label or [str(adapter) for adapter in args.adapters]
    if len(labels) != len(args.adapters):
        parser.error(f"--label names {len(labels)} adapters, {len(args.adapters)} given")
    reports = {label: summary(norms_of(adapter, args.base)) for label, adapter in zip(labels, args.adapters)}
    for label, report in reports.items():
        print(f"{label}: total norm {report['total_norm']:.3f}, "
              f"top quarter of modules {100 * report['top_quarter_energy_share']:.1f}% of the energy")
    if args.json:
        write_json_atomic(args.json, reports)
    if args.plot:
        plot(reports, args.plot)


if __name__ == "__main__":
    with torch.no_grad(), quiet_libraries():
        main()
