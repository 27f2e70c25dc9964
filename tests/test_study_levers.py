"""The accuracy study's levers: the rank-stable scale rule, the gradient-informed start, B's own learning rate,
the aligned grid, a learned gain per module.

Each is checked against an independent reference: the dense gradient of the concatenated update, the scale a
rule must give, the learning rate each optimizer group must hold."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from gfa_peft import GfaConfig, delta_weights, layout_of
from gfa_peft.analysis.budget import gfa_params
from gfa_peft.layout import build_layout
from gfa_peft.training.methods import PlacementError, peft_config, place
from gfa_peft.tuner.gradient_init import init_from_gradient
from gfa_peft.tuner.layer import GfaLayer
from references import reference_scale
from toy_models import MLP, SharedWidth

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(r: int, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(MLP().double(), GfaConfig(r=r, target_modules=["lin0", "lin1", "lin2"], **config))


def _batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 10, generator=generator, dtype=torch.float64),
             torch.randn(5, 3, generator=generator, dtype=torch.float64)) for _ in range(count)]


def _dense_gradient(model, batches) -> torch.Tensor:
    """G: the loss gradient of each target weight at the base model, concatenated in the layout's order, m x k."""
    layout = layout_of(model)
    with model.disable_adapter():
        for x, y in batches:
            torch.nn.functional.mse_loss(model(x), y).backward()
    base = model.base_model.model
    flat = torch.cat([base.get_submodule(piece.name).base_layer.weight.grad.reshape(-1) for piece in layout.modules])
    return torch.cat([flat, flat.new_zeros(layout.padding)]).view(layout.m, layout.k)


@pytest.mark.parametrize("scale_rule", ["constant", "rsqrt"])
@pytest.mark.parametrize("power_iterations", [0, 1])
def test_gradient_init_gives_the_top_right_singular_vectors_of_the_dense_gradient(power_iterations, scale_rule):
    model = _toy(r=3, scale_rule=scale_rule)
    batches = _batches()
    for parameter in model.base_model.model.parameters():
        parameter.requires_grad_(True)  # only so the dense reference can read the base weights' gradients
    reference = torch.linalg.svd(_dense_gradient(model, batches), full_matrices=False)
    model.zero_grad(set_to_none=True)
    layout = layout_of(model)
    values = init_from_gradient(
        model.base_model,
        lambda: (torch.nn.functional.mse_loss(model(x), y) for x, y in batches),
        oversample=layout.max_rank(),  # the sketch then spans G's whole range: the result is exact
        power_iterations=power_iterations,
    )
    B, A = model.base_model.gfa_B["default"].weight, model.base_model.gfa_A["default"].weight
    assert torch.count_nonzero(B) == 0  # the update still starts at exactly zero
    # each row of A is (up to sign) the corresponding right singular vector of G
    alignment = (A @ reference.Vh[:3].T).abs().diagonal()
    torch.testing.assert_close(alignment, torch.ones(3, dtype=A.dtype), rtol=0, atol=1e-8)
    torch.testing.assert_close(values[:3], reference.S[:3], rtol=1e-8, atol=1e-12)
    assert all(delta.abs().max() == 0 for delta in delta_weights(model).values())
    assert B.requires_grad and A.requires_grad
    assert all(p.grad is None for p in model.parameters())  # the passes leave no gradient behind


def test_gradient_init_factors_are_the_ones_the_layers_use():
    model = _toy(r=2)
    batches = _batches(1)
    init_from_gradient(model.base_model, lambda: (torch.nn.functional.mse_loss(model(x), y) for x, y in batches))
    with torch.no_grad():
        model.base_model.gfa_B["default"].weight.fill_(0.5)
    assert all(delta.abs().max() > 0 for delta in delta_weights(model).values())


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_rsqrt_scale_rule_scales_every_slice_by_one_over_sqrt_r(rank):
    constant = _toy(r=rank, init_weights=False, scale_rule="constant")
    rsqrt = _toy(r=rank, init_weights=False, scale_rule="rsqrt")
    for name, delta in delta_weights(constant).items():
        torch.testing.assert_close(delta_weights(rsqrt)[name], delta / math.sqrt(rank), rtol=1e-12, atol=0)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert not torch.allclose(constant(x), rsqrt(x)) or rank == 1


def test_scale_rule_is_saved_and_refused_when_unknown(tmp_path):
    model = _toy(r=2, scale_rule="rsqrt")
    model.save_pretrained(tmp_path)
    assert GfaConfig.from_pretrained(str(tmp_path)).scale_rule == "rsqrt"
    with pytest.raises(ValueError, match="scale_rule must be one of constant, rsqrt"):
        GfaConfig(r=2, scale_rule="sqrt")


def test_an_adapter_saved_before_scale_rules_existed_loads_with_the_update_it_was_trained_with(tmp_path):
    """Such a config has no scale_rule field: it trained with s = scale, so it loads as "constant" whatever
    GfaConfig's default is now."""
    model = _toy(r=4, init_weights=False, scale_rule="constant")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["scale_rule"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP().double(), tmp_path)
    assert loaded.peft_config["default"].scale_rule == "constant"
    for name, delta in delta_weights(model).items():
        torch.testing.assert_close(delta_weights(loaded)[name], delta, rtol=1e-12, atol=0)


def test_weighted_adapter_of_rsqrt_adapters_keeps_their_update():
    model = _toy(r=2, init_weights=False, scale_rule="rsqrt")
    expected = {name: 0.5 * delta for name, delta in delta_weights(model).items()}
    model.add_weighted_adapter(["default"], [0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    for name, delta in delta_weights(model, "mix").items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-12, atol=1e-15)


def test_lora_and_dora_get_the_same_scale_rule():
    assert peft_config("lora", {"r": 16}, ["q"]).lora_alpha == 16  # scaling alpha / r = 1, like GFA's s = 1
    rsqrt = peft_config("dora", {"r": 16}, ["q"], scale_rule="rsqrt")
    assert rsqrt.use_rslora and rsqrt.use_dora and rsqrt.lora_alpha / math.sqrt(rsqrt.r) == 1 / 4
    assert peft_config("gfa", {"r": 16}, ["q"], scale_rule="rsqrt").effective_scale == 1 / 4
    with pytest.raises(ValueError, match="vera has no scale"):
        peft_config("vera", {"r": 16}, ["q"], scale_rule="rsqrt")


def _shared_width_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return SharedWidth().double()


def _probe() -> torch.Tensor:
    return torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _aligned_adapter(tmp_path) -> tuple[torch.nn.Module, torch.Tensor]:
    """A saved SharedWidth adapter on the aligned grid, and its output on `_probe()`."""
    config = GfaConfig(r=3, target_modules=["up", "mid", "out"], grid="aligned", init_weights=False)
    model = get_peft_model(_shared_width_base(), config)
    model.save_pretrained(tmp_path)
    return model, model(_probe())


def test_aligned_adapter_is_saved_and_loads_back_on_its_grid(tmp_path):
    model, output = _aligned_adapter(tmp_path)
    layout = layout_of(model)
    assert (layout.m, layout.k) == (15, 24)  # d = 348: the square grid would be 20 x 18
    saved = GfaConfig.from_pretrained(str(tmp_path))
    assert saved.grid == "aligned" and saved.layout["grid"] == "aligned" and saved.layout["k"] == 24
    loaded = PeftModel.from_pretrained(_shared_width_base(), tmp_path)  # the saved config's grid wins
    assert layout_of(loaded) == layout and layout_of(loaded).grid == "aligned"
    assert not torch.allclose(output, _shared_width_base()(_probe()))  # the adapter does change the output
    torch.testing.assert_close(loaded(_probe()), output, rtol=0, atol=0)


def test_a_config_whose_grid_contradicts_its_layout_record_is_refused(tmp_path):
    model, _ = _aligned_adapter(tmp_path)
    record = model.peft_config["default"].layout
    with pytest.raises(ValueError, match="GfaConfig.grid is 'square' but its layout record was laid out on the "
                                         "'aligned' grid"):
        GfaConfig(r=3, target_modules=["up", "mid", "out"], layout=record)
    with pytest.raises(ValueError, match="GfaConfig.grid must be one of square, aligned, got 'diagonal'"):
        GfaConfig(r=3, grid="diagonal")


def test_aligned_grid_refuses_modules_of_several_input_widths_and_leaves_the_model_alone():
    model = MLP()
    with pytest.raises(ValueError, match="one input width shared by all target modules, but they have 7, 10, 20$"):
        get_peft_model(model, GfaConfig(r=1, target_modules=["lin0", "lin1", "lin2"], grid="aligned"))
    assert not any(isinstance(module, GfaLayer) for module in model.modules())


def test_placement_counts_gfa_on_the_aligned_grid():
    shapes = [("up", (12, 12)), ("mid", (12, 12)), ("out", (5, 12))]
    aligned = place("gfa", shapes, anchor="1", grid="aligned")
    layout = build_layout(shapes, "aligned")
    # LoRA r=1 counts 24 + 24 + 17 = 65; GFA's rank nearest it is 2 at 15 + 24 = 39 a rank (square: 20 + 18 = 38)
    assert aligned.knobs == {"r": 2, "grid": "aligned"} and aligned.trainable == gfa_params(layout, 2) == 78
    assert place("gfa", shapes, rank=5, grid="aligned").trainable == 5 * 39
    assert place("gfa", shapes, anchor="1").trainable == 76
    with pytest.raises(PlacementError, match="--grid is a setting of gfa; lora has none"):
        place("lora", shapes, anchor="1", grid="aligned")


# --- a learned gain per module ------------------------------------------------------------------------------------

def _gained_toy() -> torch.nn.Module:
    """The MLP toy with random factors and module gains other than 1 (as after training)."""
    model = _toy(r=2, init_weights=False, module_gain=True)
    with torch.no_grad():
        model.base_model.gfa_gain["default"].weight.copy_(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))
    return model


def test_gain_gradients_match_autograd_through_the_dense_update():
    """Every module's weight is W_i + s g_i slice_i(B A), formed from the whole m x k product; autograd through
    that independent reference gives the gradients of B, A and the gains."""
    model = _gained_toy()
    tuner, layout = model.base_model, layout_of(model)
    B, A = (tuner.gfa_B["default"].weight, tuner.gfa_A["default"].weight)
    gains = tuner.gfa_gain["default"].weight
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()

    leaves = [tensor.detach().clone().requires_grad_() for tensor in (B, A, gains)]
    flat = (leaves[0] @ leaves[1]).reshape(-1)
    base, scale = model.base_model.model, reference_scale(model.peft_config["default"])
    weights = {f"{piece.name}.base_layer.weight": base.get_submodule(piece.name).base_layer.weight
               + scale * leaves[2][index] * flat[piece.offset : piece.offset + piece.numel].view(piece.shape)
               for index, piece in enumerate(layout.modules)}
    with model.disable_adapter():
        reference = torch.func.functional_call(base, weights, (x,))
    torch.nn.functional.mse_loss(reference, y).backward()
    for live, leaf in zip((B, A, gains), leaves):
        torch.testing.assert_close(live.grad, leaf.grad, rtol=1e-10, atol=1e-12)
    assert gains.grad.abs().min() > 0


def test_gains_start_at_one_and_are_counted_in_the_placement():
    model = _toy(r=2, module_gain=True)
    assert torch.equal(model.base_model.gfa_gain["default"].weight, torch.ones(3, dtype=torch.float64))
    shapes = [("lin0", (20, 10)), ("lin1", (7, 20)), ("lin2", (3, 7))]
    plain, gained = place("gfa", shapes, anchor="1"), place("gfa", shapes, anchor="1", module_gain=True)
    assert gained.knobs == {**plain.knobs, "module_gain": True} and gained.trainable == plain.trainable + 3
    assert place("gfa", shapes, rank=2, module_gain=True).trainable == gfa_params(build_layout(shapes), 2) + 3
    assert model.get_nb_trainable_parameters()[0] == gfa_params(layout_of(model), 2, module_gain=True)
    assert peft_config("gfa", gained.knobs, ["lin0"]).module_gain
    with pytest.raises(PlacementError, match="--module-gain is a setting of gfa; lora has none"):
        place("lora", shapes, anchor="1", module_gain=True)


def test_reused_inference_weight_follows_the_gains():
    model = _gained_toy().eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.base_model.gfa_gain["default"].weight.mul_(3.0)
        after = model(x)
    model.base_model.peft_config["default"].cache_inference_update = False
    for module in model.modules():
        if isinstance(module, GfaLayer):
            module.gfa_cache_update["default"] = False
    with torch.no_grad():
        torch.testing.assert_close(after, model(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before, after)


def test_weighted_adapters_refuse_module_gains_and_leave_the_model_alone():
    model = _gained_toy()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot combine adapter default: it has module gains"):
        model.add_weighted_adapter(["default"], [0.5], "mix", combination_type="cat")
    assert set(model.peft_config) == {"default"}
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_saved_gains_must_match_the_config(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    _gained_toy().save_pretrained(tmp_path / "gained")
    _toy(r=2, init_weights=False).save_pretrained(tmp_path / "plain")
    for folder, module_gain in (("gained", False), ("plain", True)):
        config_path = tmp_path / folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "module_gain": module_gain}))
    with pytest.raises(ValueError, match=r"holds tensors that belong to no GFA adapter: \['base_model.gfa_gain'\]"):
        GfaConfig.from_pretrained(str(tmp_path / "gained"))
    with pytest.raises(ValueError, match=r"missing \['base_model.gfa_gain'\]"):
        GfaConfig.from_pretrained(str(tmp_path / "plain"))
    weights = tmp_path / "short" / "adapter_model.safetensors"
    _gained_toy().save_pretrained(tmp_path / "short")
    tensors = load_file(weights)
    save_file({**tensors, "base_model.gfa_gain": tensors["base_model.gfa_gain"][:2]}, weights)
    with pytest.raises(ValueError, match=r"base_model.gfa_gain has shape \[2\], its config promises \[3\]"):
        GfaConfig.from_pretrained(str(tmp_path / "short"))
