"""Quick start: adapt a tiny Llama with GFA, train a few steps, save, reload, merge.

Runs in about 20 s on a 2-core CPU, most of it importing torch, transformers and PEFT, and downloads nothing
(the model is built from a config).
"""

import tempfile
import warnings

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import gfa_peft  # registers GFA with PEFT
from gfa_peft import GfaConfig


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices
    model = get_peft_model(tiny_llama(), GfaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    layout = gfa_peft.layout_of(model)
    print(f"GFA layout: N={len(layout.modules)} modules, d={layout.d}, m x k = {layout.m} x {layout.k}, r={layout.r}")

    # A task the frozen random model cannot do: continue a fixed repeating sequence.
    sequence = torch.arange(32).repeat(2)[None].repeat(8, 1) % 128
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    model.train()
    for step in range(1, 41):
        loss = model(input_ids=sequence, labels=sequence).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(tiny_llama(), directory)
        same = torch.equal(reloaded(input_ids=sequence).logits, model(input_ids=sequence).logits)
        print(f"saved and reloaded: outputs identical = {same}")
    merged = reloaded.merge_and_unload()
    gap = (merged(input_ids=sequence).logits - model(input_ids=sequence).logits).abs().max().item()
    print(f"merged into plain {type(merged).__name__}: max output difference {gap:.2e}")


if __name__ == "__main__":
    main()
