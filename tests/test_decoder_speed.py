"""The fast decoder paths against plain references: packed multiple-choice scoring (one query, its choices after
it, the LM head at the answer positions only) and the answer-only training loss."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, TrainingArguments

from gfa_peft.data.encoding import IGNORE_INDEX, ChoiceSequence, choice_sequences, encode_choice_training
from gfa_peft.training.evaluation import best_choices, choice_log_likelihoods
from gfa_peft.training.config import RunConfig
from gfa_peft.training.run import AnswerLossTrainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
PAD = 0


def tiny_llama(attention: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def with_lora(model: LlamaForCausalLM) -> torch.nn.Module:
    """A PEFT-wrapped model whose adapter changes the outputs (random B, not PEFT's zero start)."""
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()


def mixed_questions(seed: int = 0) -> list[ChoiceSequence]:
    """Questions of 3 to 14 query tokens with 2 to 5 choices of 1 to 4 tokens; in the last question the longest
    choice keeps one query token fewer (as a truncated query would), so its choices do not all share the query; the
    question after it has an empty choice."""
    generator = random.Random(seed)
    sequences = []
    for question in range(9):
        query = [generator.randrange(1, VOCAB) for _ in range(generator.randint(3, 14))]
        for _ in range(generator.randint(2, 5)):
            choice = [generator.randrange(1, VOCAB) for _ in range(generator.randint(1, 4))]
            sequences.append(ChoiceSequence(question, query + choice, len(choice)))
    query = [generator.randrange(1, VOCAB) for _ in range(8)]
    sequences += [ChoiceSequence(9, query + [5], 1), ChoiceSequence(9, query + [6, 7], 2),
                  ChoiceSequence(9, query[1:] + [8, 9, 10], 3)]
    sequences += [ChoiceSequence(10, query[:4], 0), ChoiceSequence(10, query[:4] + [11], 1)]  # an empty choice scores 0
    return sequences


@torch.no_grad()
def plain_scores(model: torch.nn.Module, sequences: list[ChoiceSequence], padding_side: str) -> list[float]:
    """The plain scorer: every (query, choice) sequence in one padded batch, logits at every position."""
    width = max(len(sequence.input_ids) for sequence in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = []
    for row, sequence in enumerate(sequences):
        offset = width - len(sequence.input_ids) if padding_side == "left" else 0
        ids[row, offset:offset + len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
        mask[row, offset:offset + len(sequence.input_ids)] = 1
        offsets.append(offset)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    log_probs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().log_softmax(-1)
    scores = []
    for row, (sequence, offset) in enumerate(zip(sequences, offsets, strict=True)):
        end = offset + len(sequence.input_ids)
        scores.append(sum(log_probs[row, t - 1, ids[row, t]].item() for t in range(end - sequence.choice_length, end)))
    return scores


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_packed_scores_equal_one_sequence_per_choice(padding_side, attention, peft, batch_size):
    model = tiny_llama(attention)
    model = with_lora(model) if peft else model
    sequences = mixed_questions()
    expected = plain_scores(model, sequences, padding_side)
    packed = choice_log_likelihoods(model, sequences, PAD, batch_size, progress=False)
    assert packed == pytest.approx(expected, abs=1e-4)
    assert best_choices(sequences, packed) == best_choices(sequences, expected)


def test_scoring_runs_the_head_at_the_answer_tokens_and_each_query_once():
    model = tiny_llama()
    sequences = mixed_questions(seed=3)
    rows_into_head, tokens_into_body = [], []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_into_head.append(args[0].shape[:-1].numel()))
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: tokens_into_body.append(args[0]))
    choice_log_likelihoods(model, sequences, PAD, batch_size=64, progress=False)

    # one batch: logits_to_keep=1 leaves one position per row, then one row per answer token
    (first, answers) = rows_into_head
    assert answers == sum(sequence.choice_length for sequence in sequences)
    (ids,) = tokens_into_body
    real_tokens = int((ids != PAD).sum())
    shared = {(s.question, tuple(s.input_ids[:-s.choice_length])): len(s.input_ids) - s.choice_length for s in sequences}
    assert real_tokens <= sum(shared.values()) + answers  # each distinct query once (a pad-valued token only lowers it)
    assert first == ids.shape[0]


def test_real_tokenizer_sequences_score_alike(cache):
    """Through `choice_sequences` (the training code's own encoding) with truncation that cuts some queries."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    folder = cache / "models" / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    data = Dataset.from_dict({"query": ["what colour is the sky ?", "the film was good and the cast was fun"],
                              "choices": [["blue", "the grass is red", "fun"], ["good", "dull and boring", "red"]],
                              "label": [0, 1]})
    sequences = choice_sequences(tokenizer, data, max_length=9)
    packed = choice_log_likelihoods(model, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    assert packed == pytest.approx(plain_scores(model, sequences, "right"), abs=1e-4)


# ---------------------------------------------------------------- training: the loss of the answer tokens only

def answer_batch(cache, size: int = 6) -> dict:
    from transformers import AutoTokenizer

    from gfa_peft.data.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(cache / "models" / "smollm2")
    _, data = load_task("arc_easy", cache)
    examples = encode_choice_training(tokenizer, data["train"].select(range(size)), max_length=32)
    return DataCollatorForSeq2Seq(tokenizer)(examples)


def answer_trainer(model, tmp_path) -> AnswerLossTrainer:
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                                  remove_unused_columns=False)
    return AnswerLossTrainer(model=model, args=arguments)


@pytest.mark.parametrize("counted", [True, False], ids=["tokens-counted", "per-batch-mean"])
def test_answer_loss_and_gradients_equal_transformers_causal_lm_loss(cache, tmp_path, counted):
    model = with_lora(LlamaForCausalLM.from_pretrained(cache / "models" / "smollm2")).train()
    batch = answer_batch(cache)
    answer_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert answer_tokens < batch["labels"].numel() // 2  # the query's labels are ignored: most positions are

    kwargs = {"num_items_in_batch": torch.tensor(answer_tokens)} if counted else {}
    expected = model(**batch, **kwargs).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    rows_into_head = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows_into_head.append(args[0].shape[:-1].numel()))
    loss = answer_trainer(model, tmp_path).compute_loss(model, dict(batch), **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for grad, parameter in zip(expected_grads, [p for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(parameter.grad, grad, atol=1e-5, rtol=1e-4)
    assert rows_into_head == [batch["input_ids"].shape[0], answer_tokens]


def test_a_bfloat16_run_trains_scores_and_is_named_for_it(cache, tmp_path):
    config = RunConfig(model="smollm2", task="arc_easy", method="lora", anchor="1", steps=2, lr=1e-2,
                       dtype="bfloat16", cache=str(cache))
    metrics = train(config, tmp_path / "run", progress=False)
    assert metrics["eval_examples"] == 10 and metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN
    from gfa_peft.training.run import prepare

    assert prepare(config).name == "lora-1-s0-lr0.01-bfloat16"


def test_two_processes_train_the_same_multiple_choice_adapter_as_one(cache, tmp_path):
    """The answer-only loss goes through the DDP-wrapped model: gradients are still averaged over the processes."""
    from safetensors.torch import load_file

    from gfa_peft.cli import main
    from test_train_torchrun import torchrun

    def arguments(out):
        return ["train", "--model", "smollm2", "--task", "arc_easy", "--method", "gfa", "--anchor", "1", "--lr", "0.01",
                "--steps", "3", "--batch-size", "4", "--cache", str(cache), "--out", str(out), "--no-progress"]

    assert main(arguments(tmp_path / "one")) == 0
    result = torchrun(arguments(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    for key in expected:
        assert not torch.equal(expected[key], torch.zeros_like(expected[key]))
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
