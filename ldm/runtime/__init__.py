"""The torch-free CPU runtime: numpy and ONNX Runtime over a bundle's exported graphs.

Nothing in this package imports torch, diffusers, transformers or open_clip (tests/test_runtime.py checks
it in a fresh process): ``ldm generate`` on the CPU runs through ``runner`` when the graphs are exported,
and starts in well under a second instead of the seconds torch's imports take.

    steps      the sampler's per-step arithmetic, shared with the torch pipeline
    noise      torch.randn's CPU generator in numpy
    tokenizer  open_clip's SimpleTokenizer
    graphs     where the graphs are cached, how a session opens one
    runner     tokens -> contexts -> guided sampling -> decoded pixels
"""
