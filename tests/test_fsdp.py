"""FSDP2 through accelerate, on two CPU processes over gloo: the prior and the contrastive model train with their
weights sharded, give the loss curve of one process with the doubled batch, resume from sharded checkpoints, and
end with one model.safetensors equal to the unsharded run's."""

import json

import pytest
import torch

from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from corpora.shapes import build
from prior.model import Prior
from tests.launch import ROOT, accelerate_launch, weights
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE

pytestmark = pytest.mark.slow
FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
ON_CPU = str(ROOT / "tests" / "scripts" / "fsdp_on_cpu.py")
STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    build(root / "data", 80, resolution=16, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    VQVAE(VQVAE_PRESETS["tiny"]).save_pretrained(root / "vqvae")
    ContrastiveModel(CONTRASTIVE_PRESETS["tiny"]).save_pretrained(root / "contrastive")
    return root


def _args(world, module, out, batch, steps):
    args = [
        "--train_data_dir", str(world / "data"), "--output_dir", str(out), "--preset", "tiny", "--seed", "1",
        "--max_train_steps", str(steps), "--lr_schedule_steps", str(STEPS), "--train_batch_size", str(batch),
        "--checkpointing_steps", "2", "--validation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--logging_steps", "1", "--resume_from_checkpoint", "latest", "--learning_rate", "3e-3",
    ]  # fmt: skip
    if module == "prior.train":
        stages = ["--vqvae", str(world / "vqvae"), "--contrastive", str(world / "contrastive")]
        return [*args, *stages, "--codes_cache", str(world / "codes"), "--eval_rows", "8"]
    return [*args, "--resolution", "16", "--eval_rows", "16"]


def _settled(name, tensor):
    """The weights that training determines. The key bias of attention (the middle third of open_clip's
    in_proj_bias) shifts every score of a query alike, so its gradient is zero but for rounding, which AdamW scales
    up to full steps: it differs between any two runs that round differently."""
    if name.endswith("in_proj_bias"):
        q, _, v = tensor.chunk(3)
        return torch.cat([q, v])
    return tensor


def _losses(out):
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.parametrize(("module", "model_class"), [("prior.train", Prior), ("contrastive.train", ContrastiveModel)])
def test_two_sharded_processes_match_one_with_the_doubled_batch_and_resume(world, tmp_path, module, model_class):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    accelerate_launch(module, _args(world, module, one, 8, STEPS))
    # two processes with half the batch each, stopped after 2 steps, then resumed from the sharded checkpoint
    for steps in (2, STEPS):
        out = accelerate_launch(
            ON_CPU, [module, *_args(world, module, sharded, 4, steps)], 2, as_module=False, config_file=FSDP_CONFIG
        )
    assert "resumed from" in out and "at step 2" in out
    shards = sharded / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert any(f.suffix == ".distcp" for f in shards.iterdir())  # the checkpoint holds shards, not a gathered copy
    a, b = _losses(one), _losses(sharded)
    assert sorted(b) == list(range(1, STEPS + 1)) and a[1] != a[STEPS]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    final = model_class.from_pretrained(sharded)  # one model.safetensors, loadable as any saved model
    expected, found = weights(one), final.state_dict()
    assert expected.keys() == found.keys()
    assert all(torch.allclose(_settled(k, expected[k]), _settled(k, found[k]), atol=1e-5) for k in expected)
    assert (sharded / "eval.json").is_file()
