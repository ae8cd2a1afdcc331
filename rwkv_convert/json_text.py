"""Reports as strict JSON: what jq and JavaScript's JSON.parse accept."""

from __future__ import annotations

import math


def json_safe(obj):
    """obj with every non-finite float as None (an unbounded tolerance, a metric of non-finite logits): strict
    JSON parsers (jq, JavaScript's JSON.parse) refuse Infinity and NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
