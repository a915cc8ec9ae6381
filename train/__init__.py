"""Training: data loading, caching, accelerate loops, EMA, checkpoints. Imports the library, never the reverse."""
