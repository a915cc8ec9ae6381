"""CLIP scorer: normalised embeddings equal to open_clip's own preprocessing and encoders, and the
CLIP-score convention 100 * max(cos, 0)."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conditioning import ClipModelConfig, TextTowerConfig, VisionTowerConfig, build_text_encoder, load_clip_scorer
from conditioning.clip_model import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ClipModelConfig(embed_dim=16, vision=VisionTowerConfig(image_size=32, width=32, layers=1, patch_size=8, head_width=16),
                          text=TextTowerConfig(width=16, heads=2, layers=2))
    root = tmp_path_factory.mktemp("clip")
    build_text_encoder({"model_cfg": cfg.to_open_clip()}).save_pretrained(root)
    return root


def pil_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_embeddings_match_open_clip_preprocessing_and_encoders(bundle):
    scorer = load_clip_scorer(bundle)
    model = scorer.model
    images = pil_images(3, 32)
    transform = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)  # open_clip's eval preprocessing
    with torch.no_grad():
        ref_img = F.normalize(model.encode_image(torch.stack([transform(im) for im in images])), dim=-1)
        ref_txt = F.normalize(model.encode_text(open_clip.tokenize(["a", "b", "c"])), dim=-1)
    torch.testing.assert_close(scorer.encode_image(images), ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(scorer.encode_text(["a", "b", "c"]), ref_txt, rtol=0, atol=1e-6)
    as_tensor = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(scorer.encode_image(as_tensor), ref_img, rtol=0, atol=1e-5)  # [-1, 1] tensors
    assert torch.allclose(scorer.encode_image(pil_images(2, 80)).norm(dim=-1), torch.ones(2))  # resized and cropped


def test_score_is_100_times_clamped_cosine(bundle):
    scorer = load_clip_scorer(bundle / "text_encoder")
    images = torch.rand(4, 3, 48, 40) * 2 - 1
    prompts = ["a red circle", "a koala", "a green square", "the sun"]
    cos = (scorer.encode_image(images) * scorer.encode_text(prompts)).sum(-1)
    torch.testing.assert_close(scorer.cosine(images, prompts), cos)
    torch.testing.assert_close(scorer.score(images, prompts), 100 * cos.clamp(min=0))
    shared = scorer.score(images, ["a koala"])  # one prompt for all images
    assert shared.shape == (4,) and bool(((shared >= 0) & (shared <= 100)).all())
    with pytest.raises(ValueError, match="4 images and 2 prompts"):
        scorer.score(images, prompts[:2])
    with pytest.raises(ValueError, match="float tensor"):
        scorer.encode_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, [])
