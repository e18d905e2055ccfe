import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.data import DataConfig, load_image_text
from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from corpora.shapes import build
from prior.codes import CodesCacheError, encode_dataset, load_codes
from prior.model import Prior
from prior.train import TextFeatures, make_loss, parse_args, prior_config
from tests.launch import accelerate_launch, weights
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A 16 px shapes world, two tiny untrained tokenizers (8x8 codes from 16 codes) and a tiny text encoder."""
    root = tmp_path_factory.mktemp("prior_stages")
    build(root / "shapes", 120, resolution=16, seed=0, workers=1, progress=False)
    for name, seed in (("vqvae", 0), ("other_vqvae", 1)):
        torch.manual_seed(seed)
        VQVAE(VQVAE_PRESETS["tiny"]).save_pretrained(root / name)
    torch.manual_seed(0)
    ContrastiveModel(CONTRASTIVE_PRESETS["tiny"]).save_pretrained(root / "contrastive")
    data = DataConfig(train_data_dir=str(root / "shapes"), resolution=16)
    codes = encode_dataset(root / "vqvae", data, root / "codes", batch_size=16, progress=False)
    return SimpleNamespace(root=root, data=data, codes=codes)


def test_codes_round_trip_to_the_tokenizers_codes(stages):
    train, validation = load_codes(stages.codes, stages.root / "vqvae", stages.data)
    splits = load_image_text(stages.data, progress=False)
    tokenizer = VQVAE.from_pretrained(stages.root / "vqvae")
    for codes, images in ((train, splits.train), (validation, splits.validation)):
        assert len(codes) == len(images) > 0
        pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
        expected = torch.cat([tokenizer.encode(chunk).flatten(1) for chunk in pixels.split(16)])
        items = [codes[i] for i in range(len(codes))]
        assert torch.equal(torch.stack([item["codes"] for item in items]), expected)
        assert items[0]["codes"].dtype == torch.long and items[0]["codes"].shape == (64,)
        assert [item["text"] for item in items] == images.captions
        assert [item["index"] for item in items] == list(range(len(images)))
        assert codes.sources == [images.source(i) for i in range(len(images))]
    info = json.loads((stages.codes / "codes_info.json").read_text())
    assert info["rows"] == {"train": len(train), "validation": len(validation)}
    assert info["vqvae"]["grid_size"] == 8 and codes.codes(0).dtype == np.int16


def test_codes_from_another_tokenizer_or_other_data_are_refused(stages, tmp_path):
    with pytest.raises(CodesCacheError, match="another tokenizer"):
        load_codes(stages.codes, stages.root / "other_vqvae")
    other_data = DataConfig(train_data_dir=stages.data.train_data_dir, resolution=16, max_train_samples=50)
    with pytest.raises(CodesCacheError, match="max_train_samples=None"):
        load_codes(stages.codes, stages.root / "vqvae", other_data)
    with pytest.raises(CodesCacheError, match="not a codes folder"):
        load_codes(stages.root / "shapes")
    with pytest.raises(CodesCacheError, match="refusing to replace"):
        encode_dataset(stages.root / "vqvae", stages.data, stages.root / "shapes", progress=False)
    with pytest.raises(CodesCacheError, match="takes 16 px"):
        encode_dataset(stages.root / "vqvae", DataConfig(train_data_dir=stages.data.train_data_dir, resolution=32),
                       tmp_path / "codes", progress=False)  # fmt: skip
    flat = DataConfig(train_data_dir=str(stages.root / "shapes" / "train"), resolution=16, validation_fraction=0)
    with pytest.raises(CodesCacheError, match="no validation rows"):
        encode_dataset(stages.root / "vqvae", flat, tmp_path / "codes", progress=False)
    # encoding again with the other tokenizer replaces the folder, which then belongs to it
    copy = encode_dataset(stages.root / "vqvae", stages.data, tmp_path / "codes", batch_size=64, progress=False)
    encode_dataset(stages.root / "other_vqvae", stages.data, copy, batch_size=64, progress=False)
    load_codes(copy, stages.root / "other_vqvae", stages.data)
    assert [p.name for p in tmp_path.iterdir()] == ["codes"]  # no temporary folder left behind


def _cli(stages, out, *extra):
    return [
        "--vqvae", str(stages.root / "vqvae"), "--contrastive", str(stages.root / "contrastive"),
        "--train_data_dir", stages.data.train_data_dir, "--output_dir", str(out), "--preset", "tiny", *extra,
    ]  # fmt: skip


def test_the_prior_config_takes_its_sizes_from_the_stages(stages):
    args = parse_args(_cli(stages, stages.root / "unused", "--cond_drop_prob", "0.2"))
    tokenizer, encoder = VQVAE_PRESETS["tiny"], CONTRASTIVE_PRESETS["tiny"]
    config = prior_config(args, tokenizer, encoder)
    assert (config.grid_size, config.codebook_size, config.text_width, config.text_length) == (8, 16, 32, 16)
    assert config.cond_drop_prob == 0.2
    args.model_config = '{"grid_size": 4}'
    with pytest.raises(ValueError, match="grid_size=4, but the tokenizer"):
        prior_config(args, tokenizer, encoder)
    args.model_config = '{"cond_drop_prob": 0.5}'
    with pytest.raises(ValueError, match="--cond_drop_prob has cond_drop_prob=0.2"):
        prior_config(args, tokenizer, encoder)


def test_cached_text_features_equal_fresh_ones_and_the_cache_is_bounded(stages):
    encoder = ContrastiveModel.from_pretrained(stages.root / "contrastive")
    text = TextFeatures(encoder, cache_mb=3 * 16 * (4 * 32 + 1) / 2**20)  # room for 3 captions
    assert text.max_entries == 3
    captions = ["a blue ball on grass", "a red star", "a blue ball on grass", "a green box", "a pink heart"]
    features, mask = text(captions)
    fresh, fresh_mask = encoder.text_token_features(captions)
    assert torch.allclose(features, fresh, atol=1e-6) and torch.equal(mask, fresh_mask)
    assert len(text) == 3
    again, _ = text(captions[::-1])  # hits and misses mixed
    assert torch.allclose(again, fresh.flip(0), atol=1e-6)


def test_a_few_steps_with_condition_dropout_lower_the_loss(stages):
    train, _ = load_codes(stages.codes)
    args = parse_args(_cli(stages, stages.root / "unused"))
    config = prior_config(args, VQVAE_PRESETS["tiny"], CONTRASTIVE_PRESETS["tiny"])
    assert config.cond_drop_prob > 0
    torch.manual_seed(0)
    model = Prior(config).train()
    compute_loss = make_loss(TextFeatures(ContrastiveModel.from_pretrained(stages.root / "contrastive"), 16))
    batch = torch.utils.data.default_collate([train[i] for i in range(16)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        loss, logs = compute_loss(model, batch, step)
        assert float(logs["bits_per_code"]) == pytest.approx(loss.item() / math.log(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _train_args(stages, out, steps, batch, *extra):
    return _cli(stages, out, *[
        "--max_train_steps", str(steps), "--train_batch_size", str(batch), "--checkpointing_steps", "2",
        "--validation_steps", "2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "1",
        "--logging_steps", "1", "--adam_epsilon", "1e-3", "--cond_drop_prob", "0.5",
        "--eval_rows", "8", "--samples_per_prompt", "1", *extra,
    ])  # fmt: skip


def test_training_script_resumes_and_two_processes_match_one(stages, tmp_path):
    # condition dropout is drawn per row from (seed, epoch, row), so it agrees across process counts too
    one, two = tmp_path / "one", tmp_path / "two"
    first = accelerate_launch("prior.train", _train_args(stages, one, 3, 8))
    assert "encoding the data" in first
    # the 2-process run resumes from the 1-process run's step-2 checkpoint and takes step 3 with half the batch
    shutil.copytree(one / "checkpoints" / "checkpoint-2", two / "checkpoints" / "checkpoint-2")
    resume = ("--resume_from_checkpoint", "latest", "--codes_cache", str(one / "codes"))
    out = accelerate_launch("prior.train", _train_args(stages, two, 3, 4, *resume), num_processes=2)
    assert "at step 2" in out and f"rows from {one / 'codes'}" in out and "encoding the data" not in out
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert {p.name for p in (two / "checkpoints" / "checkpoint-3").glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in logged} == {3}
    assert {"loss", "bits_per_code", "val_bits_per_code"} <= {key for row in logged for key in row}
    evaluation = json.loads((two / "eval.json").read_text())
    assert 0 < evaluation["bits_per_code"] < 2 * math.log2(16) and evaluation["rows"] > 0
    assert (two / "samples.png").is_file() and (one / "samples" / "samples-000002.png").is_file()
    prior = Prior.from_pretrained(two)
    assert (prior.config.grid_size, prior.config.codebook_size) == (8, 16)
