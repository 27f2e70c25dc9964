"""The approximation lens (Section 3): at a trainable budget P, which class fits a target update better?

For a target update Delta* = {Delta W_i*} over N target modules, Definition 3.1 and Proposition 3.2 give

    E_GFA(P)  = min over r with r (m + k) <= P               of  sum_{j > r}   sigma_j(M*)^2
    E_LoRA(P) = min over integers r_i with sum_i r_i c_i <= P  of  sum_i sum_{j > r_i} sigma_ij^2,   c_i = p_i + q_i,

where M* is the m x k global matrix GFA lays the update out as (the method's own layout, zero padding) and
sigma_ij are the singular values of Delta W_i* seen as a p_i x q_i matrix (q_i the product of its trailing
dimensions: a convolution kernel counts as p_i x (in * kh * kw)). By Eckart-Young-Mirsky each error is a tail
of a spectrum, the energy beyond the best rank-r approximation.

- `spectrum`: `Spectrum` (tail energies), dense for the module updates, randomized for the large M*, whose
  top r_max = P_max // (m + k) singular values come with an error bound.
- `lora`: E_LoRA(P) as an exact integer optimum (`LoraProblem`), beside greedy and equal-rank allocations.
- `report`: M* itself, E_GFA(P), and `lens_report`: both errors at every budget, verdicts and crossovers.
"""

from gfa_peft.analysis.lens.lora import (
    LoraAllocation,
    LoraProblem,
    lora_error_equal_rank,
    lora_error_exact,
    lora_error_greedy,
)
from gfa_peft.analysis.lens.report import (
    DEFAULT_TIE_TOLERANCE,
    BudgetRecord,
    Crossover,
    GfaPoint,
    LensReport,
    check_budgets,
    feasible_floor,
    gfa_error,
    global_matrix,
    global_spectrum,
    lens_report,
    module_order_effect,
    module_spectra,
)
from gfa_peft.defaults import DEFAULT_RTOL
from gfa_peft.analysis.lens.spectrum import Spectrum, dense_spectrum, top_singular_values

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_TIE_TOLERANCE",
    "BudgetRecord",
    "Crossover",
    "GfaPoint",
    "LensReport",
    "LoraAllocation",
    "LoraProblem",
    "Spectrum",
    "check_budgets",
    "dense_spectrum",
    "feasible_floor",
    "gfa_error",
    "global_matrix",
    "global_spectrum",
    "lens_report",
    "lora_error_equal_rank",
    "lora_error_exact",
    "lora_error_greedy",
    "module_order_effect",
    "module_spectra",
    "top_singular_values",
]
