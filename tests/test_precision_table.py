"""One table per precision (stexport.bundle.precision): the CLI's choices, the manifest schema, the export's float
types, the libtorch exports and verify's default gates are read from it, with today's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stexport.bundle.manifest import InputRecord, Manifest
from stexport.bundle.precision import (
    FLOAT_PRECISIONS,
    INPUT_FORMATS,
    LIBTORCH_PRECISIONS,
    NAMES,
    PRECISIONS,
    float_dtype,
    gate_text,
    input_format_of,
)
from stexport.errors import StexportError


def test_the_table_holds_todays_values():
    assert NAMES == ("fp32", "fp16", "int8") and FLOAT_PRECISIONS == ("fp32", "fp16") == LIBTORCH_PRECISIONS
    assert float_dtype("fp32") == "float32" and float_dtype("fp16") == "float16"
    with pytest.raises(KeyError):
        float_dtype("int8")  # an INT8 graph's float type is chosen at build (--int8-float)
    assert [PRECISIONS[n].calibrated for n in NAMES] == [False, False, True]
    assert gate_text("fp32") == "max|Δ| ≤ 1e-3 and 100% top-1 agreement"
    assert gate_text("fp16") == "≥ 99% top-1 agreement"
    assert gate_text("int8") == "≤ 1 pt accuracy drop (≥ 95% agreement without labels)"


def test_every_stage_reads_the_table():
    from stexport.calibration.qdq import FLOAT_TYPES

    from stexport.build import aoti, export, torchscript
    from stexport.build.names import INPUT_FORMATS as CLI_FORMATS
    from stexport.build.names import PRECISIONS as CLI_PRECISIONS
    from stexport.build.options import INT8_FLOATS
    from stexport.build.verify import GATES

    assert CLI_PRECISIONS == NAMES and CLI_FORMATS == tuple(INPUT_FORMATS) and INT8_FLOATS == FLOAT_PRECISIONS
    for n in FLOAT_PRECISIONS:
        assert export.DTYPES[n] == getattr(torch, float_dtype(n))
        assert np.dtype(FLOAT_TYPES[n]) == np.dtype(float_dtype(n))
    for mod in (torchscript, aoti):
        assert mod.PRECISIONS == {"fp32": torch.float32, "fp16": torch.float16}
        assert mod.CHECK_TOLERANCE == {"fp32": 1e-4, "fp16": 5e-2}
    for n, p in PRECISIONS.items():
        g = GATES[n]
        assert (g.max_abs, g.min_top1_agreement, g.max_accuracy_drop) == (p.max_abs, p.min_top1_agreement,
                                                                          p.max_accuracy_drop)
    schema = Manifest.model_json_schema()
    assert schema["properties"]["precision"]["enum"] == list(NAMES)


def test_input_formats_declared_once():
    from stexport.build.pipeline import input_record

    for name, f in INPUT_FORMATS.items():
        rec = input_record(name, 8, 32)
        assert (rec.dtype, rec.layout, rec.normalized_in_graph) == (f.dtype, f.layout, f.normalized_in_graph)
        assert input_format_of(rec.dtype) is f
    assert InputRecord(frames=8, size=32).shape(2) == (2, 8, 32, 32, 3)


def test_cli_precision_choices_and_gates_come_from_the_table(tiny_adapter):
    from stexport.cli.app import app

    from stexport.build.options import BuildOptions

    with pytest.raises(StexportError, match="--precision bf16: .*choose one of fp32, fp16, int8"):
        BuildOptions(adapter=tiny_adapter, precision="bf16")
    r = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "400"})
    flat = " ".join(r.output.split())
    assert "fp32 needs max|Δ| ≤ 1e-3 and 100% top-1 agreement, fp16 needs ≥ 99% top-1 agreement" in flat
    assert "(default: 1.0 fp32, 0.99 fp16, 0.95 int8 without labels)" in flat
    r = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "400"})
    assert "fp32, fp16 (strongly typed) or int8 (explicit Q/DQ; needs --calib)" in " ".join(r.output.split())
