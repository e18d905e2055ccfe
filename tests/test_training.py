import argparse

import pytest
import torch

from common.training import NonFiniteLossError, StepBatches, Trainer, add_training_args, list_checkpoints


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((4,), float(i))


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    return parser.parse_args(
        ["--output_dir", str(tmp_path), "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps",
         "2", "--lr_warmup_steps", "0", *extra]
    )  # fmt: skip


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 1)

    def compute_loss(m, batch, step):
        loss = m(batch).pow(2).mean()
        return (loss * float("nan") if step == 4 else loss), {}

    trainer = Trainer(_args(tmp_path), model, Rows(), compute_loss, collate=torch.stack)
    with pytest.raises(NonFiniteLossError, match=r"at step 5; the last good checkpoint is .*checkpoint-4"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights


def test_data_order_is_the_same_for_one_and_two_processes():
    one = iter(StepBatches(40, 8, 1, 0, seed=3))
    two = [iter(StepBatches(40, 4, 2, rank, seed=3)) for rank in (0, 1)]
    for _ in range(12):  # across epoch boundaries too
        assert next(one) == next(two[0]) + next(two[1])


def test_bad_flags_are_named(tmp_path):
    with pytest.raises(ValueError, match="--train_batch_size"):
        Trainer(_args(tmp_path, "--train_batch_size", "0"), torch.nn.Linear(4, 1), Rows(), None)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(3, 4, 1, 0, seed=0)
