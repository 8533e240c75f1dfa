"""INT8 calibration: seeded clip choice, activation ranges (minmax, percentile, entropy), Q/DQ, cache."""

from stexport.calibration.clips import ClipSet, choose
from stexport.calibration.quantize import cache_dir, quantize_bundle_model
from stexport.calibration.ranges import METHODS, RangeCollector

__all__ = ["ClipSet", "choose", "cache_dir", "quantize_bundle_model", "METHODS", "RangeCollector"]
