import pytest
import torch

from latentlab.common.errors import NonFiniteLossError
from latentlab.common.tracking import StepLog
from latentlab.lm.training import (
    LMTrainConfig,
    collate,
    masked_lm_loss,
    prompt_answer_examples,
    shuffled_batches,
    train_lm,
)


def test_sft_examples_train_on_answer_and_eos_only(tiny_lm):
    _, tokenizer = tiny_lm
    sequences, targets = prompt_answer_examples(tokenizer, ["12+7="], ["19"])
    assert tokenizer.decode(sequences[0]) == "12+7=19<eos>"
    assert targets[0] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_loss_ignores_prompt_and_padding_positions(tiny_lm):
    _, tokenizer = tiny_lm
    batch = collate(*prompt_answer_examples(tokenizer, ["12+7=", "3+4="], ["19", "7"]), tokenizer.pad_token_id)
    torch.manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, len(tokenizer))
    loss = masked_lm_loss(logits, batch)
    # logits at t predict token t+1: the first target (answer digit) is scored by the logits of "="
    changed = logits.clone()
    changed[0, :4] = torch.randn(4, len(tokenizer))  # positions predicting prompt tokens only
    changed[1, 5:] = 99.0  # positions predicting padding of the shorter row
    assert masked_lm_loss(changed, batch).item() == pytest.approx(loss.item())
    changed[0, 4, 0] += 5.0  # the position of "=" predicts the first answer token
    assert masked_lm_loss(changed, batch).item() != pytest.approx(loss.item())


def test_training_lowers_the_loss(tiny_lm):
    import copy

    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    examples = prompt_answer_examples(tokenizer, ["1+2=", "2+2=", "3+3=", "4+1="], ["3", "4", "6", "5"])
    batches = shuffled_batches(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    log = StepLog()
    train_lm(model, batches, LMTrainConfig(steps=40, batch_size=4, lr=1e-2, log_every=1), log, "test")
    assert log.rows[-1]["loss"] < 0.5 * log.rows[0]["loss"]


def test_nan_loss_stops_training_with_a_clear_error(tiny_lm):
    import copy

    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")
    examples = prompt_answer_examples(tokenizer, ["1+2="], ["3"])
    batches = shuffled_batches(examples, 1, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train_lm(model, batches, LMTrainConfig(steps=3, batch_size=1, lr=1e-3), StepLog(), "test")
