"""Text-to-image in the browser: a static site with the model's ONNX graphs, run by onnxruntime-web.

``ldm export-web`` writes the site (``export``), ``ldm serve-web`` serves it (``serve``). The
page's sampler applies per-step coefficients computed here from ``ldm.schedule`` and
``ldm.samplers`` (``coefficients``); the page tokenizes as the Python tokenizer does
(``tokenizer_spec`` + ``static/tokenizer.js``) and takes its noise from a file the exporter
writes with Python's generator (``noise``), so its images match Python's ONNX Runtime output.
"""
