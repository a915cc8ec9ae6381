"""The small CLIP text/image encoder (``ldm train-clip``)."""
