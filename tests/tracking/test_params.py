"""The config as MLflow params (glm_ft.tracking.params): every value kept, as YAML spells it."""

from __future__ import annotations

from glm_ft.tracking.params import flatten_config, split_long_values


def test_flatten_keeps_every_value_and_splits_long_ones():
    flat = flatten_config({"a": {"b": 1, "c": [1, "x"], "d": None, "e": True, "f": {}}, "g": 2.5e-5})
    assert flat == {"a.b": "1", "a.c": '[1, "x"]', "a.d": "null", "a.e": "true", "a.f": "{}", "g": "2.5e-05"}
    long = "".join(chr(ord("a") + i % 26) for i in range(13001))
    split = split_long_values({"k": long, "exact": "y" * 6000})
    assert split["exact"] == "y" * 6000
    assert "k" not in split and sorted(k for k in split if k.startswith("k.")) == ["k.0", "k.1", "k.2"]
    assert all(len(v) <= 6000 for v in split.values())
    assert split["k.0"] + split["k.1"] + split["k.2"] == long
