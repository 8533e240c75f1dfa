"""The bundle: the contract every other wing speaks.

A bundle is a directory: `stexport.json` (the typed manifest, `manifest.py`), the model files it names with
their sha256, and optional task packs (`taskpack.py`, swappable graphs in `task_graph.py`). `store.py` opens,
checks and atomically writes bundles; `labels.py` reads label files; `precision.py` is the one table of
precisions. Imports nothing of stexport but the small utilities at the package's top level.
"""


def __getattr__(name: str):  # `from stexport.bundle import Bundle` from before the wings (one release)
    from stexport._moved import package_attribute

    return package_attribute(__name__, name)
