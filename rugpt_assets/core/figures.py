"""Numbers as a person reads them in the UI: rounded to the digits that carry meaning. Files
(metrics.json, the `.eval.json` sidecars) keep full precision; only metadata is rounded."""

from __future__ import annotations

import math

QUALITY_DIGITS = 4  # losses, bits per weight: differences in the third digit matter
PERPLEXITY_DIGITS = 5  # a quantization moves perplexity by a fraction of a percent
MEASURE_DIGITS = 3  # times, memory, ratios, KL: a measurement's noise is larger than that


def significant(value: float, digits: int) -> float:
    """`value` to `digits` significant digits (non-finite values unchanged)."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def percent(fraction: float) -> float:
    """A relative change as a percentage, to `MEASURE_DIGITS` significant digits."""
    return significant(100 * fraction, MEASURE_DIGITS)
