"""The runtime: what runs a bundle, with no torch.

Video sampling and decoding (`video.py`, isolated in child processes by `decode_worker.py`), the backends
(`backends/`: a registry and one module per runtime), scoring and batching (`batch.py`), `Classifier` and
`ClassifierSpec` (`classify.py`, `batch.py`), results files (`results.py`) and `bench.py`. Reads bundles
through `stexport.bundle`; never imports `stexport.build`, `stexport.serving` or the CLI.
"""
