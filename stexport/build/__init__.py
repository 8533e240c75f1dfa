"""The build stage: checkpoints in, bundles out (needs `pip install 'stexport[export]'`: torch, open_clip).

`options.py` (build options, checked before torch loads) → `backbone.py` (open_clip) + `deltas.py` (ST-Adapter
checkpoints) → `reference.py` (the exact PyTorch model) → `fold.py` (standard-op graph) → `export.py` (ONNX)
→ `pipeline.py` (`build_bundle`: export, INT8 via `stexport.calibration`, FP16 check, the bundle). Beside it:
libtorch exports (`torchscript.py`, `aoti.py`), task packs (`packing.py`), Triton repositories (`triton.py`),
`verify.py` (a bundle against its reference) and the reference as a backend (`torch_backend.py`).
May use `stexport.runtime` and `stexport.bundle`.
"""


def __getattr__(name: str):  # `from stexport.build import build_bundle` from before the wings (one release)
    from stexport._moved import package_attribute

    return package_attribute(__name__, name)
