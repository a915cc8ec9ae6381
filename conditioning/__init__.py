"""Text conditioning: CLIP text encoders, tokenizers, the empty prompt, embedding cache."""
