"""Search quality of a contrastive model.

Shapes world: for each validation caption of a held-out composition, is the top-1 image among all
validation images one that shows every attribute the caption names (read from its metadata)?
Emoji: with one style held out of training entirely, text->image R@5 over that style's images (a hit is
an image of the queried concept); and R@1/5/10 over the held-out concepts of the validation split.

    python benchmarks/contrastive_quality.py                       # released shapes model, fresh data
    python benchmarks/contrastive_quality.py --model M --shapes-data data/shapes
    python benchmarks/contrastive_quality.py --emoji-model M --emoji-data data/emoji --heldout-style fluent

Ends with one JSON line: `shapes_heldout_top1` (when a shapes model is measured) and `emoji_heldout_style_r5`,
`emoji_concept_r1/r5/r10` (when an emoji model is given).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from common.cli import ArgumentParser
from common.data import DataConfig, load_image_text
from contrastive.evaluate import embed_dataset, key_ids, recall_at
from contrastive.model import ContrastiveModel
from pipelines.text_to_image import DEMO_MODEL

RELEASED = DEMO_MODEL / "contrastive"


def shapes_heldout_top1(model: ContrastiveModel, data_dir: str) -> dict[str, float]:
    from corpora.shapes import parse_prompt

    validation = load_image_text(DataConfig(train_data_dir=data_dir, resolution=model.config.resolution)).validation
    images, texts, captions = embed_dataset(model, validation)
    heldout = [i for i, flag in enumerate(validation.column("heldout")) if flag]
    if not heldout:
        raise ValueError(f"{data_dir} has no held-out compositions in its validation split")
    columns = {a: validation.column(a) for a in ("color", "shape", "background", "size", "position")}
    top1 = (texts[heldout] @ images.t()).argmax(1).tolist()
    hits = sum(
        all(columns[a][best] == v for a, v in parse_prompt(captions[q]).items())
        for q, best in zip(heldout, top1, strict=True)
    )
    return {"shapes_heldout_top1": hits / len(heldout), "shapes_heldout_queries": len(heldout)}


@torch.no_grad()
def concept_recall(model: ContrastiveModel, dataset, concepts: list[str], ks=(1, 5, 10)) -> dict[int, float]:
    """One query per distinct caption; a hit is any image of the caption's concept."""
    images, _, captions = embed_dataset(model, dataset)
    first = {}
    for caption, concept in zip(captions, concepts, strict=True):
        first.setdefault(caption, concept)
    queries = list(first)
    texts = torch.cat([model.encode_text(queries[i : i + 512]).float().cpu() for i in range(0, len(queries), 512)])
    ids = key_ids([first[q] for q in queries] + list(concepts))
    return recall_at(texts, images, ids[: len(queries)], ids[len(queries) :], ks)


def emoji_metrics(model: ContrastiveModel, data_dir: str, heldout_style: str) -> dict[str, float]:
    splits = load_image_text(DataConfig(train_data_dir=data_dir, resolution=model.config.resolution))
    styles = splits.train.column("style") + splits.validation.column("style")
    concepts = splits.train.column("concept") + splits.validation.column("concept")
    rows = [i for i, s in enumerate(styles) if s == heldout_style]
    if not rows:
        raise ValueError(f"no images of style {heldout_style!r} in {data_dir}")
    heldout = torch.utils.data.Subset(torch.utils.data.ConcatDataset([splits.train, splits.validation]), rows)
    result = {"emoji_heldout_style_r5": concept_recall(model, heldout, [concepts[i] for i in rows], ks=(5,))[5]}
    for k, v in concept_recall(model, splits.validation, splits.validation.column("concept")).items():
        result[f"emoji_concept_r{k}"] = v
    return result


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="shapes-world contrastive model (default: the released one)")
    parser.add_argument("--shapes-data", help="shapes-world folder (default: 4,000 freshly built images)")
    parser.add_argument("--emoji-model", help="contrastive model trained on emoji without --heldout-style")
    parser.add_argument("--emoji-data", help="emoji corpus folder with all styles")
    parser.add_argument("--heldout-style", default="fluent")
    args = parser.parse_args()
    result: dict[str, float] = {}
    if args.model or not args.emoji_model:
        model = ContrastiveModel.from_pretrained(args.model or RELEASED)
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = args.shapes_data
            if data_dir is None:
                from corpora.shapes import build

                data_dir = str(Path(tmp) / "shapes")
                build(data_dir, 4000, resolution=model.config.resolution, seed=4321, val_fraction=0.5, progress=False)
            result.update(shapes_heldout_top1(model, data_dir))
    if args.emoji_model:
        if not args.emoji_data:
            parser.error("--emoji-model needs --emoji-data")
        result.update(
            emoji_metrics(ContrastiveModel.from_pretrained(args.emoji_model), args.emoji_data, args.heldout_style)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
