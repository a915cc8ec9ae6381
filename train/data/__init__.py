"""Every data source of training: captioned images in any layout (``captioned``, ``sources``,
``images``), the held-out and caption rules (``split``), the data-set builders (``emoji``, ``shapes``, written through ``imagefolder``) and
``ldm data`` (``cli``)."""

from train.data.captioned import (  # noqa: F401  (the package's public API)
    CaptionedImages,
    DataSummary,
    ImageTransform,
    Split,
    clip_token_count,
    heldout_keys,
    load_captioned_images,
    load_captions,
    load_split,
)
