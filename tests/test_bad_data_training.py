"""Every stage trains on the good rows of a folder seeded with every kind of bad file and caption: the bad
ones are skipped and counted in one summary line; nothing crashes."""

import json

import pytest
import torch

from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from contrastive.train import main as train_contrastive
from prior.train import main as train_prior
from tests.bad_data import build_bad_folder
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE
from vqvae.train import main as train_vqvae


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    folder = build_bad_folder(root / "data")
    torch.manual_seed(0)
    VQVAE(VQVAE_PRESETS["tiny"]).save_pretrained(root / "vqvae")
    ContrastiveModel(CONTRASTIVE_PRESETS["tiny"]).save_pretrained(root / "contrastive")
    return root, folder


def _common(data, out):
    return ["--train_data_dir", str(data), "--output_dir", str(out), "--preset", "tiny", "--max_train_steps", "2",
            "--train_batch_size", "4", "--validation_fraction", "0.2", "--logging_steps", "1"]  # fmt: skip


@pytest.mark.parametrize("stage", ["vqvae", "contrastive", "prior"])
def test_each_stage_trains_on_the_good_rows(bad, tmp_path, capsys, stage):
    root, folder = bad
    args = _common(folder.root, tmp_path / stage)
    if stage == "prior":
        train_prior([*args, "--vqvae", str(root / "vqvae"), "--contrastive", str(root / "contrastive"),
                     "--eval_rows", "4", "--samples_per_prompt", "1"])  # fmt: skip
    else:
        {"vqvae": train_vqvae, "contrastive": train_contrastive}[stage]([*args, "--resolution", "16"])
    summaries = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vqclip data:")]
    assert len(summaries) == 1  # counted and reported once
    assert f"kept {len(folder.kept)} of {folder.total} rows" in summaries[0]
    steps = [json.loads(line)["step"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]
    assert (tmp_path / stage / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["vqvae", "contrastive", "prior"])
def test_one_good_row_is_refused_at_the_start_with_the_reason(bad, tmp_path, stage):
    from PIL import Image

    root, _ = bad
    data = tmp_path / "one"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "red.png")
    rows = [{"file_name": "red.png", "text": "a red square"}, {"file_name": "gone.png", "text": "a missing one"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [*_common(data, tmp_path / stage), "--train_batch_size", "1"]
    with pytest.raises(ValueError, match="the data has no validation rows"):
        if stage == "prior":
            train_prior([*args, "--vqvae", str(root / "vqvae"), "--contrastive", str(root / "contrastive")])
        else:
            {"vqvae": train_vqvae, "contrastive": train_contrastive}[stage]([*args, "--resolution", "16"])
    assert not (tmp_path / stage / "checkpoints").exists()  # refused before the first step
