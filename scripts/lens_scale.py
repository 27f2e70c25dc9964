"""Scale check of the approximation lens: a q+v-like update of about 50M entries on the CPU.

Builds synthetic updates with Llama-3.2-1B widths (q_proj 2048 x 2048, v_proj 512 x 2048; 10 layers, d = 52.4M),
each a rank-64 part with a power-law spectrum (energy about 2.7) plus dense noise (energy 1), so the spectra
decay but have a heavy tail. Then
times the pieces of `gfa lens`: the global matrix, its top-n spectrum (randomized), the module spectra, the
exact LoRA allocation at every budget, and the whole `lens_report`; with --reference it also decomposes M* densely
(a float64 Gram eigendecomposition, minutes) and reports how far the randomized head energy is from the truth.

    python scripts/lens_scale.py --threads 2 --reference
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gfa_peft.analysis.budget import ordered_layout
from gfa_peft.analysis.lens import DEFAULT_RTOL, LoraProblem, global_matrix, lens_report, module_spectra, top_singular_values


def synthetic_deltas(layers: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in range(layers):
        for name, (rows, columns) in (("q_proj", (2048, 2048)), ("v_proj", (512, 2048))):
            sigma = torch.arange(1, 65, dtype=torch.float32) ** -0.7
            left = torch.linalg.qr(torch.randn(rows, 64, generator=generator)).Q
            right = torch.linalg.qr(torch.randn(columns, 64, generator=generator)).Q
            noise = torch.randn(rows, columns, generator=generator) / (rows * columns) ** 0.5  # energy 1
            deltas[f"model.layers.{layer}.self_attn.{name}"] = (left * sigma) @ right.T + noise
    return deltas


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of all threads): on a shared machine the wall time alone misleads."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, (round(time.perf_counter() - wall, 1), round(time.process_time() - cpu, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10, help="layers of q+v modules (default: %(default)s)")
    parser.add_argument("--top", type=int, default=64, help="singular values of M* to compute (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="randomized SVD target (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--reference", action="store_true", help="also decompose M* densely and compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    deltas, build_seconds = timed(synthetic_deltas, args.layers, seed=0)
    layout = ordered_layout([(name, tuple(delta.shape)) for name, delta in deltas.items()])
    matrix, matrix_seconds = timed(global_matrix, deltas, layout)
    spectrum, spectrum_seconds = timed(top_singular_values, matrix, args.top, rtol=args.rtol)
    modules, modules_seconds = timed(module_spectra, deltas)
    lora_rank1 = sum(sum(delta.shape) for delta in deltas.values())
    top_budget = args.top * (layout.m + layout.k)
    budgets = sorted({*(lora_rank1 * rank for rank in (1, 2, 4, 8, 16)), round(0.3 * lora_rank1), top_budget})
    problem, setup_seconds = timed(LoraProblem, modules)
    _, exact_seconds = timed(lambda: [problem.exact(budget) for budget in budgets])
    _, report_seconds = timed(lens_report, deltas, layout, budgets, rtol=args.rtol)

    summary = {
        "d": layout.d, "m": layout.m, "k": layout.k, "modules": len(deltas), "threads": args.threads,
        "top": args.top, "rtol": args.rtol, "power_iterations": spectrum.iterations,
        "head_error_bound_rel": spectrum.tail_error(args.top) / spectrum.total,
        "seconds_wall_and_cpu": {
            "build_synthetic_deltas": build_seconds, "global_matrix": matrix_seconds,
            "top_singular_values": spectrum_seconds, "module_spectra": modules_seconds,
            "lora_problem_setup": setup_seconds, f"lora_exact_{len(budgets)}_budgets": exact_seconds,
            f"lens_report_{len(budgets)}_budgets": report_seconds,
        },
    }
    if args.reference:
        gram = matrix.double().T @ matrix.double()
        truth, reference_seconds = timed(lambda: torch.linalg.eigvalsh(gram).flip(0))
        true_head = truth[: args.top].cumsum(0)
        shortfall = true_head - spectrum.squares.cumsum(0)
        summary["reference"] = {
            "seconds_dense_eigendecomposition": reference_seconds,
            "max_head_shortfall_rel": float(shortfall.abs().max()) / spectrum.total,
            "min_head_shortfall_rel": float(shortfall.min()) / spectrum.total,
            "max_singular_value_rel_error": float(((truth[: args.top].sqrt() - spectrum.squares.sqrt())
                                                   / truth[: args.top].sqrt()).abs().max()),
            "shortfall_within_bound": bool((shortfall <= spectrum.head_error + 1e-9 * spectrum.total).all()),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
