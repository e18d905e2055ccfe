import argparse

import pytest
import torch
from safetensors.torch import load_file

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


def _fit(tmp_path, *extra) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    args = _args(tmp_path, "--learning_rate", "0.05", "--lr_scheduler", "cosine", *extra)
    Trainer(args, model, Rows(), lambda m, batch, step: (m(batch / 32).pow(2).mean(), {}), collate=torch.stack).fit()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_longer_lr_schedule_stops_part_way_and_resumes_on_the_same_schedule(tmp_path):
    full = _fit(tmp_path / "full", "--max_train_steps", "6", "--checkpointing_steps", "4")
    full_at_4 = torch.load(tmp_path / "full" / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    part = _fit(tmp_path / "part", "--max_train_steps", "4", "--lr_schedule_steps", "6")
    part_state = torch.load(tmp_path / "part" / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert part_state["param_groups"][0]["lr"] == full_at_4["param_groups"][0]["lr"]
    weights = [load_file(tmp_path / r / "checkpoints" / "checkpoint-4" / "model.safetensors") for r in ("full", "part")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(part, full)
    resumed = _fit(tmp_path / "part", "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert torch.equal(resumed, full)
    with pytest.raises(ValueError, match="--lr_schedule_steps"):
        Trainer(_args(tmp_path, "--lr_schedule_steps", "3"), torch.nn.Linear(4, 1), Rows(), None)
