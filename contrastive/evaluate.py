"""Retrieval metrics of a contrastive model: text->image and image->text recall at 1, 5 and 10.

Captions repeat ("a blue ball on grass" describes many images), so a retrieved item counts as a hit when its
normalized caption equals the query's: any image of "a blue ball on grass" answers that caption.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from common.data import collate


def caption_key(text: str) -> str:
    """Captions that differ only in case, punctuation or spacing are the same caption."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 128, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Normalized image and text embeddings of every row, and the captions."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    images, texts, captions = [], [], []
    for batch in tqdm(loader, desc="embedding", disable=not progress):
        images.append(model.encode_image(batch["pixel_values"].to(model.device)).float().cpu())
        texts.append(model.encode_text(batch["text"]).float().cpu())
        captions += batch["text"]
    if not captions:
        raise ValueError("cannot evaluate retrieval on an empty dataset")
    return torch.cat(images), torch.cat(texts), captions


def recall_at(
    queries: torch.Tensor,
    items: torch.Tensor,
    query_keys: torch.Tensor,
    item_keys: torch.Tensor,
    ks: tuple[int, ...],
    chunk: int = 512,
) -> dict[int, float]:
    """Fraction of queries with a relevant item (one whose key equals the query's) among their top k by dot
    product. Scored `chunk` queries at a time, so memory grows with the number of items, not its square."""
    depth = min(max(ks), len(items))
    hits = []
    for start in range(0, len(queries), chunk):
        top = (queries[start : start + chunk] @ items.t()).topk(depth, dim=1).indices
        hits.append(item_keys[top] == query_keys[start : start + chunk, None])
    found = torch.cat(hits)
    return {k: found[:, :k].any(1).float().mean().item() for k in ks}


def key_ids(values: list) -> torch.Tensor:
    """One integer per distinct value, in order of first appearance."""
    ids = {value: i for i, value in enumerate(dict.fromkeys(values))}
    return torch.tensor([ids[value] for value in values])


def retrieval_metrics(
    model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 128, progress: bool = True
) -> dict[str, float]:
    image_emb, text_emb, captions = embed_dataset(model, dataset, batch_size, progress)
    keys = key_ids([caption_key(c) for c in captions])
    ks = (1, 5, 10)
    t2i = recall_at(text_emb, image_emb, keys, keys, ks)
    i2t = recall_at(image_emb, text_emb, keys, keys, ks)
    return {
        **{f"text_to_image_r{k}": v for k, v in t2i.items()},
        **{f"image_to_text_r{k}": v for k, v in i2t.items()},
        "rows": len(captions),
        "distinct_captions": int(keys.max()) + 1,
    }
