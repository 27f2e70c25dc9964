"""transformers' Trainer trains a GFA model, writes GFA checkpoints and resumes from them."""

from __future__ import annotations

import os

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import gfa_peft
from gfa_peft import GfaConfig
from toy_models import tiny_llama


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 12), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def make_trainer(model, output_dir, max_steps):
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
        learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=1, seed=0,
    )
    return Trainer(model=model, args=arguments, train_dataset=TokenDataset())


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GfaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    B_before = gfa_peft.factors(model)[0].detach().clone()
    trainer = make_trainer(model, tmp_path, max_steps=4)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert not torch.equal(gfa_peft.factors(model)[0], B_before)

    checkpoint = tmp_path / "checkpoint-2"
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert set(saved) == {"base_model.gfa_B", "base_model.gfa_A"}

    torch.manual_seed(0)
    fresh = get_peft_model(tiny_llama(), GfaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    resumed = make_trainer(fresh, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for ours, theirs in zip(gfa_peft.factors(fresh), gfa_peft.factors(model)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)

    final = PeftModel.from_pretrained(tiny_llama_with_seed(0), tmp_path / "checkpoint-4")
    ids = TokenDataset()[0]["input_ids"][None]
    torch.testing.assert_close(final(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def tiny_llama_with_seed(seed):
    torch.manual_seed(seed)
    return tiny_llama()
