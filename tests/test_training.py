import argparse
import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

from common.cli import ArgumentParser
from common.locks import FolderLockedError
from common.training import (
    NonFiniteLossError,
    StepBatches,
    Trainer,
    TrainingConfig,
    add_training_args,
    cpu_threads,
    list_checkpoints,
    make_optimizer,
    run_script,
)
from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from prior.model import PRESETS as PRIOR_PRESETS
from prior.model import Prior
from tests.launch import ROOT
from vqvae.gan import VQGAN, PatchDiscriminator
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((4,), float(i))


def _settings(tmp_path, **changes) -> TrainingConfig:
    fixed = dict(train_batch_size=4, max_train_steps=6, checkpointing_steps=2, lr_warmup_steps=0)
    return TrainingConfig(output_dir=tmp_path, **{**fixed, **changes})


def test_the_flags_give_the_settings_with_the_same_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_args(parser, learning_rate=5e-4)
    args = parser.parse_args(["--output_dir", str(tmp_path), "--train_batch_size", "8", "--detect_anomaly"])
    settings = TrainingConfig.from_args(args)
    assert settings == TrainingConfig(tmp_path, learning_rate=5e-4, train_batch_size=8, detect_anomaly=True)
    assert {f.name for f in fields(TrainingConfig)} <= vars(args).keys()  # every setting has its flag


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 1)

    def compute_loss(m, batch, step):
        loss = m(batch).pow(2).mean()
        return (loss * float("nan") if step == 4 else loss), {}

    trainer = Trainer(_settings(tmp_path), model, Rows(), compute_loss, collate=torch.stack)
    with pytest.raises(NonFiniteLossError, match=r"at step 5; the last good checkpoint is .*checkpoint-4"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights


def test_checkpoints_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        Trainer(_settings(tmp_path, max_train_steps=2), torch.nn.Linear(4, 1), Rows(), _loss, collate=torch.stack).fit()
    finally:
        os.umask(old)
    checkpoint = list_checkpoints(tmp_path)[-1]
    modes = {p.stat().st_mode & 0o777 for p in checkpoint.iterdir()}
    assert checkpoint.stat().st_mode & 0o777 == 0o755 and modes == {0o644}


def _loss(model, batch, step):
    return model(batch).pow(2).mean(), {}


def test_data_order_is_the_same_for_one_and_two_processes():
    one = iter(StepBatches(40, 8, 1, 0, seed=3))
    two = [iter(StepBatches(40, 4, 2, rank, seed=3)) for rank in (0, 1)]
    for _ in range(12):  # across epoch boundaries too
        assert next(one) == next(two[0]) + next(two[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [({"train_batch_size": 0}, "--train_batch_size must be at least 1"),
     ({"logging_steps": 0}, "--logging_steps must be at least 1"),
     ({"lr_schedule_steps": 3}, r"--lr_schedule_steps \(3\) must be at least --max_train_steps \(6\)"),
     ({"learning_rate": float("nan")}, "--learning_rate must be a positive number"),
     ({"lr_scheduler": "step"}, "--lr_scheduler must be one of constant, cosine, linear"),
     ({"adam_beta2": 1.0}, r"--adam_beta2 must be in \[0, 1\)"),
     ({"adam_weight_decay": -0.1}, "--adam_weight_decay must be >= 0")],
)  # fmt: skip
def test_bad_settings_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, **change)


def test_too_few_rows_for_a_batch_are_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(3, 4, 1, 0, seed=0)


def _fit(tmp_path, **changes) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    settings = _settings(tmp_path, learning_rate=0.05, lr_scheduler="cosine", **changes)
    Trainer(
        settings, model, Rows(), lambda m, batch, step: (m(batch / 32).pow(2).mean(), {}), collate=torch.stack
    ).fit()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_longer_lr_schedule_stops_part_way_and_resumes_on_the_same_schedule(tmp_path):
    full = _fit(tmp_path / "full", max_train_steps=6, checkpointing_steps=4)
    full_at_4 = torch.load(tmp_path / "full" / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    part = _fit(tmp_path / "part", max_train_steps=4, lr_schedule_steps=6)
    part_state = torch.load(tmp_path / "part" / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert part_state["param_groups"][0]["lr"] == full_at_4["param_groups"][0]["lr"]
    weights = [load_file(tmp_path / r / "checkpoints" / "checkpoint-4" / "model.safetensors") for r in ("full", "part")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(part, full)
    resumed = _fit(tmp_path / "part", max_train_steps=6, resume_from_checkpoint="latest")
    assert torch.equal(resumed, full)


class Layers(torch.nn.Module):
    """One parameter of each kind weight decay must leave alone, next to layers it must reach."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.pos = torch.nn.Parameter(torch.randn(3, 4))
        self.linear = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv1d(4, 4, 1)
        self.batch_norm = torch.nn.BatchNorm1d(4)
        self.layer_norm = torch.nn.LayerNorm(4)
        self.group_norm = torch.nn.GroupNorm(2, 4)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)


def _decayed_names(optimizer, model) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {group["weight_decay"] > 0: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    return groups.get(True, set()), groups.get(False, set())


@pytest.mark.parametrize(
    ("model", "decayed", "not_decayed"),
    [
        (
            lambda: ContrastiveModel(CONTRASTIVE_PRESETS["tiny"]),
            {"clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection",
             "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.transformer.resblocks.0.mlp.c_fc.weight"},
            {"clip.logit_scale", "clip.token_embedding.weight", "clip.positional_embedding",
             "clip.visual.positional_embedding", "clip.visual.class_embedding", "clip.ln_final.weight",
             "clip.transformer.resblocks.0.attn.in_proj_bias", "clip.visual.ln_pre.bias"},
        ),
        (
            lambda: Prior(PRIOR_PRESETS["tiny"]),
            {"text_proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.0.weight", "head.weight"},
            {"null_text", "start", "row_pos", "col_pos", "text_pos", "code_embed.weight", "norm.weight",
             "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"},
        ),
        (
            lambda: VQGAN(VQVAE(VQVAE_PRESETS["tiny"]), PatchDiscriminator(16, 2)),
            {"vqvae.encoder.net.0.weight", "vqvae.decoder.net.0.weight", "discriminator.net.0.weight"},
            {"vqvae.quantizer.codebook", "vqvae.encoder.net.1.block.0.weight", "vqvae.encoder.net.0.bias",
             "discriminator.net.3.weight"},
        ),
        (
            Layers,
            {"linear.weight", "conv.weight"},
            {"embed.weight", "pos", "linear.bias", "conv.bias", "batch_norm.weight", "batch_norm.bias",
             "layer_norm.weight", "layer_norm.bias", "group_norm.weight", "group_norm.bias"},
        ),
    ],
)  # fmt: skip
def test_weight_decay_reaches_layer_matrices_only(tmp_path, model, decayed, not_decayed):
    torch.manual_seed(0)
    model = model()
    optimizer = make_optimizer(model, _settings(tmp_path, learning_rate=0.5, adam_weight_decay=0.1))
    got_decayed, got_not_decayed = _decayed_names(optimizer, model)
    assert decayed <= got_decayed and not_decayed <= got_not_decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got_decayed | got_not_decayed == trainable and not got_decayed & got_not_decayed
    # one step on zero gradients moves a parameter only through weight decay: by lr * decay = 5% of itself
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * 0.95 if name in got_decayed else before[name]
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_trainer_logs_its_weight_decay_groups(tmp_path, capsys):
    model = Layers()
    trainer = Trainer(_settings(tmp_path, adam_weight_decay=0.1), model, Rows(), None)
    assert _decayed_names(trainer.optimizer, model) == _decayed_names(make_optimizer(model, trainer.settings), model)
    assert "weight decay 0.1 on 2 tensors (32 parameters); none on 10 tensors (84 parameters)" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_whose_optimizer_groups_do_not_fit_is_refused_by_name(tmp_path):
    _fit(tmp_path, max_train_steps=2)
    path = tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    merged = {**state["param_groups"][0], "params": [i for g in state["param_groups"] for i in g["params"]]}
    torch.save({**state, "param_groups": [merged]}, path)  # one group for every weight
    with pytest.raises(ValueError, match="checkpoint-2: its optimizer state does not fit this model"):
        _fit(tmp_path, max_train_steps=4, resume_from_checkpoint="latest")


class SlowRows(Rows):
    def __getitem__(self, i):
        time.sleep(0.01)  # data that takes time: the logged step time includes it
        return super().__getitem__(i)


def test_logs_hold_the_step_time_and_tensors_are_read_only_when_logged(tmp_path):
    read = []

    class Logged(torch.Tensor):
        def __float__(self):
            read.append(1)
            return super().__float__()

    def compute_loss(m, batch, step):
        loss = m(batch).pow(2).mean()
        return loss, {"twice": (2 * loss.detach()).as_subclass(Logged)}

    settings = _settings(tmp_path, logging_steps=3, checkpointing_steps=100)
    Trainer(settings, torch.nn.Linear(4, 1), SlowRows(), compute_loss, collate=torch.stack).fit()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [3, 6] and len(read) == 2  # 6 steps, read twice
    for row in logged:
        assert row["twice"] == pytest.approx(2 * row["loss"])
        assert row["step_seconds"] >= 4 * 0.01  # the 4 rows of a batch, at least
        assert row["samples_per_s"] == pytest.approx(4 / row["step_seconds"])


def test_the_optimizer_is_fused_and_steps_as_the_loop_over_tensors_does(tmp_path):
    settings = _settings(tmp_path, adam_weight_decay=0.1)
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = Layers()
        optimizer = make_optimizer(model, settings)
        assert all(group["fused"] for group in optimizer.param_groups)
        for group in optimizer.param_groups:
            group["fused"] = fused
        for _ in range(3):
            sum(p.square().sum() for p in model.parameters()).backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and not torch.equal(weights[0], weights[0] * 0)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--logging_steps", "0"), ("--validation_steps", "0"), ("--checkpoints_total_limit", "-1"),
     ("--checkpoints_total_limit", "0"), ("--checkpointing_steps", "0"), ("--seed", str(2**70))],
)  # fmt: skip
def test_the_parser_refuses_counts_below_one_naming_the_flag(tmp_path, capsys, flag, value):
    parser = ArgumentParser(prog="stage.train")
    add_training_args(parser)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--output_dir", str(tmp_path), flag, value])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"stage.train: error: argument {flag}: must be an integer")


def _nan_at_step_5(m, batch, step):
    loss = m(batch).pow(2).mean()
    return (loss * float("nan") if step == 4 else loss), {}


def test_a_nan_loss_is_one_line_and_status_2_naming_the_step(tmp_path, capsys):
    def main():
        Trainer(_settings(tmp_path), torch.nn.Linear(4, 1), Rows(), _nan_at_step_5, collate=torch.stack).fit()

    with pytest.raises(SystemExit) as stopped:
        run_script(main, "stage.train")
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("stage.train: error: the loss became nan at step 5; the last good checkpoint is")


def test_a_full_disk_while_checkpointing_says_so_and_the_last_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)

    def main():
        Trainer(_settings(tmp_path), torch.nn.Linear(4, 1), Rows(), _loss, collate=torch.stack).fit()

    with pytest.raises(SystemExit) as stopped:
        run_script(main, "stage.train")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2
    assert "could not write checkpoint-4 at step 4 (No space left on device; is the disk full?)" in err
    assert f"the last checkpoint, {tmp_path / 'checkpoints' / 'checkpoint-2'}, is complete and good" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]  # nothing half-written
    monkeypatch.setattr(torch, "save", real_save)
    trainer = Trainer(
        _settings(tmp_path, resume_from_checkpoint="latest"), torch.nn.Linear(4, 1), Rows(), _loss, collate=torch.stack
    )
    trainer.fit()
    assert trainer.step == 6 and [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-6"


HOLD_LOCK = """
import sys, time
from common import locks
locks.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(folder, seconds):
    """A process (started from the repository root) that holds `folder`'s lock for `seconds`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder), str(seconds), "--my-run"], cwd=root, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"held\n"
    return holder


def test_a_second_run_on_one_output_folder_names_the_process_that_holds_it(tmp_path):
    holder = _hold_lock(tmp_path, 60)
    try:
        with pytest.raises(FolderLockedError, match=rf"is in use by process {holder.pid} on .* \(-c .*--my-run\)"):
            Trainer(_settings(tmp_path), torch.nn.Linear(4, 1), Rows(), _loss, collate=torch.stack)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock is taken over; so is what a killed run left half-written
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").mkdir(parents=True)
    Trainer(_settings(tmp_path), torch.nn.Linear(4, 1), Rows(), _loss, collate=torch.stack).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"checkpoint-{s}" for s in (2, 4, 6)]


def test_accelerate_launch_on_a_cpu_gets_every_core_not_one(tmp_path):
    """`accelerate launch` without --cpu sets OMP_NUM_THREADS=1 on a machine with no GPU, which ran training on one
    core of many; a training process takes the machine's cores instead, or --cpu_threads."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import sys, torch\n"
        "from common.training import TrainingConfig, set_cpu_threads\n"
        "requested = int(sys.argv[1]) if len(sys.argv) > 1 else None\n"
        "set_cpu_threads(TrainingConfig(output_dir='unused', cpu_threads=requested))\n"
        "print('threads', torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cores = len(os.sched_getaffinity(0))
    # the launcher's default, --cpu_threads, and OMP_NUM_THREADS=1 set by whoever ran the launcher (kept)
    for extra, omp, expected in (([], {}, cores), (["1"], {}, 1), ([], {"OMP_NUM_THREADS": "1"}, 1)):
        result = subprocess.run([*launcher, *extra], env={**env, **omp, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                text=True, timeout=120, check=True)  # fmt: skip
        assert f"threads {expected}\n" in result.stdout, result.stdout + result.stderr


def test_cpu_threads_are_shared_among_launched_processes_and_left_alone_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "getppid", lambda: -1)  # no parent's environment to read: the launcher's default
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(None) is None and cpu_threads(3) == 3  # not launched: torch's own choice, or the flag's
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(None) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # chosen with --num_cpu_threads_per_process: kept
    assert cpu_threads(None) is None
