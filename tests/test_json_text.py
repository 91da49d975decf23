"""JSON files the project writes for other programs hold no NaN / Infinity tokens (not JSON:
jq, JavaScript and strict parsers refuse them): what was not measured is null."""

import json
import math

import pytest

from toist_core.json_text import dumps_null_for_nan, finite_or_null


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere_in_the_value():
    value = {"p50": float("nan"), "rows": [{"iou": float("inf")}, (1.5, -math.inf)], "n": 3, "name": "nan",
             "ok": True}
    assert _strict(dumps_null_for_nan(value, indent=1)) == {"p50": None, "rows": [{"iou": None}, [1.5, None]],
                                                           "n": 3, "name": "nan", "ok": True}
    assert finite_or_null(0.25) == 0.25 and finite_or_null(None) is None


def test_plain_json_dumps_writes_what_strict_parsers_refuse():
    """Why the helper exists: json.dumps alone writes a bare NaN token."""
    with pytest.raises(ValueError, match="NaN is not JSON"):
        _strict(json.dumps({"p50": float("nan")}))


def test_the_demo_report_and_the_recipe_metrics_are_written_with_it():
    """The two writers whose values may be unmeasured (latency percentiles of a demo that received
    nothing; a median over no mask pair) go through the helper."""
    import inspect

    from toist_ros import demo
    from training import default_model

    assert "dumps_null_for_nan(report" in inspect.getsource(demo)
    assert "dumps_null_for_nan({**results" in inspect.getsource(default_model.export_default)
