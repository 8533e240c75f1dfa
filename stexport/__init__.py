"""stexport: ship ST-Adapter video models (fold, export, classify, verify).

The Python API for classifying videos (imports no torch; heavy modules load on first use):

    import stexport

    spec = stexport.ClassifierSpec("path/to/bundle", backend="auto", options={"threads": 2},
                                   batch_size=32, decode_threads=2)
    with spec.open() as clf:                          # or stexport.open("path/to/bundle", ...)
        for item in clf.classify_batch(["a.mp4", "b.mp4"]):
            print(item.to_dict())                     # the schema of `stexport infer --json`

- `ClassifierSpec`: frozen, picklable "bundle + backend + options" (ship it to workers; `.open()` there once).
- `Classifier`: an open bundle + backend. `classify(source) -> Result` (raises VideoError for a bad video),
  `classify_batch(sources) -> Iterator[Result | Failure]` (input order, views of several videos per backend
  call, never raises for one bad input), `timeline(source, window, stride)`.
- `Result` (`top`: [(class index, label, probability)], best first; `views`, `frames`, timings) and `Failure`
  (`source`, `error`: one line naming the input); both have `to_dict()`.
- Task packs on a swappable bundle: `ClassifierSpec(..., task="ssv2.stpack")`, `Classifier(..., task=)`,
  `classify(source, task=)`, `classify_batch(sources, task=)` or `(source, task)` pairs; results carry the
  task's name and labels.
- `Sampling`: frames, size, rate, temporal × spatial views (default: the bundle's).
- `StexportError`: every error stexport raises on purpose (bad input, bundle, backend, option).
"""

from stexport import _moved
from stexport.errors import StexportError
from stexport.version import __version__

_moved.install()

_LAZY = {
    "ClassifierSpec": "stexport.runtime.spec",
    "Classifier": "stexport.runtime.classify",
    "Result": "stexport.runtime.classify",
    "Failure": "stexport.runtime.classify",
    "Sampling": "stexport.runtime.video",
    "VideoError": "stexport.runtime.video",
}


def open(bundle, backend: str = "auto", **kw):  # noqa: A001 - stexport.open(bundle) reads as intended
    """An open Classifier: `stexport.open(bundle, backend, labels=, sampling=, top_k=, batch_size=,
    decode_threads=, **backend_options)`; the same as ClassifierSpec(...).open() with options as keywords."""
    from stexport.runtime.spec import spec_from

    return spec_from(bundle, backend=backend, **kw).open()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stexport' has no attribute {name!r}")


__all__ = ["ClassifierSpec", "Classifier", "Result", "Failure", "Sampling", "VideoError", "StexportError",
           "open", "__version__"]
