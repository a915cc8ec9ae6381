"""Held-out retrieval for a CLIP: text -> image and image -> text top-k accuracy, with chance level.

A query is right at k when one of its k nearest candidates (cosine similarity)
carries the same caption as the query. Captions can repeat (the shapes set has
many images per caption), so every image with the query's caption counts as a
hit, and chance is computed for that: with m matching candidates out of N, a
random ranking puts one in the top k with probability 1 - C(N-m, k) / C(N, k).
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch


def _topk_hits(sim: torch.Tensor, match: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) bool: whether any of the k highest-scoring candidates matches, for each query row."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k)
    return match.gather(1, top).any(dim=1)


def _chance(match: torch.Tensor, k: int) -> float:
    n = match.shape[1]
    k = min(k, n)
    per_query = [1 - comb(n - int(m), k) / comb(n, k) for m in match.sum(dim=1)]
    return sum(per_query) / len(per_query)


def retrieval_metrics(
    text_emb: torch.Tensor, image_emb: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Retrieval accuracies over a held-out set of (image, caption) pairs.

    Args:
        text_emb: (N, E) embeddings of ``captions`` (any scale; they are normalised here).
        image_emb: (N, E) embeddings of the images, image i captioned ``captions[i]``.
        captions: the N captions.

    Returns:
        ``text_to_image_top{k}``, ``image_to_text_top{k}`` and their ``chance_*`` levels, in [0, 1],
        plus ``n``. Text queries are the distinct captions (each asked once); image queries are all images.
    """
    if text_emb.shape[0] != image_emb.shape[0] or text_emb.shape[0] != len(captions):
        raise ValueError(f"{text_emb.shape[0]} text and {image_emb.shape[0]} image embeddings for {len(captions)} captions")
    text = torch.nn.functional.normalize(text_emb.float(), dim=-1)  # (N, E)
    image = torch.nn.functional.normalize(image_emb.float(), dim=-1)  # (N, E)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])  # (N,)
    first = torch.tensor([captions.index(c) for c in ids])  # (U,) one text query per distinct caption
    t2i_match = label[first].unsqueeze(1) == label.unsqueeze(0)  # (U, N)
    i2t_match = label.unsqueeze(1) == label[first].unsqueeze(0)  # (N, U)
    t2i_sim = text[first] @ image.T  # (U, N)
    i2t_sim = image @ text[first].T  # (N, U)
    out: dict[str, float] = {"n": float(len(captions))}
    for k in ks:
        out[f"text_to_image_top{k}"] = _topk_hits(t2i_sim, t2i_match, k).float().mean().item()
        out[f"chance_text_to_image_top{k}"] = _chance(t2i_match, k)
        out[f"image_to_text_top{k}"] = _topk_hits(i2t_sim, i2t_match, k).float().mean().item()
        out[f"chance_image_to_text_top{k}"] = _chance(i2t_match, k)
    return out


@torch.no_grad()
def evaluate(module: torch.nn.Module, pairs, batch_size: int, autocast) -> dict[str, float]:
    """Held-out retrieval metrics of a ``ContrastivePair``'s CLIP on a ``PairSet`` (each image with
    its first caption); {} for an empty set."""
    if not len(pairs):
        return {}
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    texts, images = [], []
    for start in range(0, len(pairs), batch_size):
        index = torch.arange(start, min(start + batch_size, len(pairs)))
        x = pairs.images[index].to(device).float() / 255  # (b, 3, S, S)
        t = pairs.tokens(index).to(device)  # (b, L), each image's first caption
        with autocast():
            image_features, text_features, _ = module(x, t)
        images.append(image_features.float().cpu())
        texts.append(text_features.float().cpu())
    module.train(was_training)
    return retrieval_metrics(torch.cat(texts), torch.cat(images), pairs.first_captions())
