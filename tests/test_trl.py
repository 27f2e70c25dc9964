"""TRL's SFTTrainer trains a GFA adapter given as `peft_config`, and the saved adapter reloads exactly."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import gfa_peft
from gfa_peft import GfaConfig
from tiny_assets import WORDS, save_tiny_llama

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_trainer_trains_saves_and_reloads_a_gfa_adapter(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [" ".join(WORDS[i : i + 6]) for i in range(8)]
    arguments = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, max_length=16,
        bf16=False,  # TRL defaults to bf16 autocast, which accelerate leaves wrapped around the trained model
    )
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=arguments,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=GfaConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "GFA"
    B_before = gfa_peft.factors(model)[0].detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    assert not torch.equal(gfa_peft.factors(model)[0], B_before)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    ids = tokenizer(texts[:2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
