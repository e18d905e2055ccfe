import json
import math

import pytest
import torch

from common.training import StepBatches
from contrastive.evaluate import caption_key, key_ids, recall_at
from contrastive.model import PRESETS, ContrastiveConfig, ContrastiveModel
from contrastive.train import augment, make_collate, make_loss
from corpora.shapes import build
from tests.launch import ROOT, accelerate_launch, weights

TINY = PRESETS["tiny"]


def _model(seed=0) -> ContrastiveModel:
    torch.manual_seed(seed)
    return ContrastiveModel(TINY).eval()


def test_shapes_and_normalization():
    model = _model()
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    image = model.encode_image(pixels)
    text = model.encode_text(["a blue ball on grass", "a red box", ""])
    assert image.shape == text.shape == (3, TINY.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(model.encode_image(pixels, normalize=False).norm(dim=-1), torch.ones(3))
    features, mask = model.text_token_features(["a blue ball on grass", "ball"])
    assert features.shape == (2, TINY.context_length, TINY.text_width)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [7, 3]  # start + words + end


def test_same_input_same_embedding_and_save_load(tmp_path):
    model = _model()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    texts = ["a blue ball on grass", "a small red star"]
    assert torch.equal(model.encode_image(pixels), model.encode_image(pixels))
    model.save_pretrained(tmp_path / "clip")
    loaded = ContrastiveModel.from_pretrained(tmp_path / "clip")
    assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
    assert torch.equal(loaded.encode_text(texts), model.encode_text(texts))


def test_long_text_is_truncated_and_bad_input_refused():
    model = _model()
    tokens = model.tokenize(["word " * 10_000])
    assert tokens.shape == (1, TINY.context_length)
    with pytest.raises(ValueError, match="list of strings"):
        model.tokenize("a single string")
    with pytest.raises(ValueError, match="expected pixels"):
        model.encode_image(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        ContrastiveConfig(resolution=18, patch_size=4)


def test_a_few_dozen_steps_rank_the_right_image_first():
    torch.manual_seed(0)
    model = ContrastiveModel(TINY).train()
    colors = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1)}
    pixels = torch.stack([torch.tensor(c, dtype=torch.float).view(3, 1, 1).expand(3, 16, 16) for c in colors.values()])
    pixels = pixels + 0.05 * torch.randn_like(pixels)
    captions = [f"a {name} square" for name in colors]
    tokens = model.tokenize(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = make_loss()
    for step in range(40):
        loss, _ = loss_fn(model, {"pixel_values": pixels, "tokens": tokens}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model.encode_text(captions) @ model.encode_image(pixels).t()
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
    assert loss.item() < math.log(4) / 2


def test_two_process_loss_equals_one_process_loss(tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"loss{world}.json"
        accelerate_launch(str(ROOT / "tests" / "scripts" / "clip_loss_parts.py"), [str(out)], world, as_module=False)
        results[world] = json.loads(out.read_text())
    assert results[2]["world"] == 2
    assert results[2]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[2]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-4)


def test_batches_never_repeat_a_caption():
    keys = [caption_key(c) for c in ["A blue ball!", "a blue ball", "red box", "red box", "star", "heart"] * 20]
    batches = StepBatches(len(keys), 4, 1, 0, seed=0, keys=keys)
    first = iter(batches)
    seen_rows = set()
    for _ in range(20):
        rows = [row for row, _ in next(first)]
        assert len({keys[r] for r in rows}) == len(rows) == 4
        seen_rows.update(rows)
    assert len(seen_rows) > 60  # rows keep flowing, not just the first few

    def rows(start, count):
        resumed = iter(StepBatches(len(keys), 4, 1, 0, seed=0, start=start, keys=keys))
        return [[row for row, _ in next(resumed)] for _ in range(count)]

    assert rows(2, 3) == rows(0, 5)[2:]  # resuming at batch 2 gives the same batches


def test_flip_only_when_caption_has_no_side():
    pixels = torch.arange(16.0).view(1, 1, 16).expand(3, 16, 16)
    flipped_any = False
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = augment({"pixel_values": pixels, "text": "a red ball on the left"}, g, crop_scale=1.0)
        assert torch.equal(out["pixel_values"], pixels)
        g = torch.Generator().manual_seed(seed)
        out = augment({"pixel_values": pixels, "text": "a red ball"}, g, crop_scale=1.0)
        flipped_any |= torch.equal(out["pixel_values"], pixels.flip(-1))
    assert flipped_any


def test_captions_are_tokenized_as_the_tokenizer_does():
    model = _model()
    rows = [{"pixel_values": torch.zeros(3, 16, 16), "text": t, "index": i}
            for i, t in enumerate(["a blue ball", "a red box on the left", "a blue ball"])]  # fmt: skip
    collate = make_collate(model.tokenizer, cached_captions=1)
    for _ in range(2):  # cached or not
        assert torch.equal(collate(rows)["tokens"], model.tokenizer([row["text"] for row in rows]))


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes16")
    build(folder, 160, resolution=16, seed=0, workers=1, progress=False)
    return folder


def _args(data, out, steps, batch, *extra):
    return [
        "--train_data_dir", str(data), "--resolution", "16", "--output_dir", str(out), "--preset", "tiny",
        "--max_train_steps", str(steps), "--train_batch_size", str(batch), "--checkpointing_steps", "2",
        "--validation_steps", "2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "1",
        "--logging_steps", "1", "--adam_epsilon", "1e-3", *extra,
    ]  # fmt: skip


def test_training_script_resumes_and_matches_two_processes(shapes16, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    accelerate_launch("contrastive.train", _args(shapes16, one, 3, 16))
    accelerate_launch("contrastive.train", _args(shapes16, two, 2, 8), num_processes=2)
    out = accelerate_launch(
        "contrastive.train", _args(shapes16, two, 3, 8, "--resume_from_checkpoint", "latest"), num_processes=2
    )
    assert "at step 2" in out
    a, b = weights(one), weights(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    evaluation = json.loads((two / "eval.json").read_text())
    assert {"text_to_image_r1", "text_to_image_r5", "image_to_text_r10"} <= evaluation.keys()
    assert all(0 <= evaluation[k] <= 1 for k in evaluation if "_r" in k)
    model = ContrastiveModel.from_pretrained(two)
    assert model.encode_text(["a blue ball"]).shape == (1, TINY.embed_dim)


def test_recall_in_chunks_equals_recall_over_the_whole_score_matrix():
    torch.manual_seed(0)
    queries, items = torch.randn(37, 8), torch.randn(37, 8)
    keys = key_ids([i % 9 for i in range(37)])  # repeated captions: several relevant items per query
    scores = queries @ items.t()
    relevant = keys[:, None] == keys[None, :]
    top = scores.topk(10, dim=1).indices
    expected = {k: relevant.gather(1, top)[:, :k].any(1).float().mean().item() for k in (1, 5, 10)}
    assert recall_at(queries, items, keys, keys, (1, 5, 10), chunk=4) == expected
    assert 0 < expected[1] < expected[10] <= 1
