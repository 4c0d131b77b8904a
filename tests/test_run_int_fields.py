"""Every whole-number field of a trial's configuration takes the exact number it is given (never through a
float: 10**20 + 1 stays 10**20 + 1 until its bound refuses it), refuses what is not a whole number, and
refuses a number outside its bound with one readable line naming the field and the bound, however large."""
import math
import sys
from dataclasses import fields
from fractions import Fraction

import numpy as np
import pytest

from study.config import ConfigError, TrialConfig

# Each int field's bounds, as its help and docs state them: a new int field must say its bound here too.
BOUNDS = {
    "resolution": (0, 1024), "depth": (1, 9), "base_filters": (1, 4096), "max_filters": (1, 4096),
    "batch_size": (1, 8192), "epochs": (1, 1000), "warmup_epochs": (0, 1000), "seed": (0, 2 ** 32 - 1),
    "train_limit": (0, 10 ** 12), "eval_limit": (0, 10 ** 12), "preview_count": (0, 64),
}
INT_FIELDS = [f.name for f in fields(TrialConfig) if f.type == "int"]


def inputs(low: int, high: int) -> list:
    """Values of every kind a space file, a command line or a searcher hands over, around and far past the bounds."""
    return [low, high, low - 1, high + 1, (low + high) // 2, 10 ** 20, 10 ** 20 + 1, -10 ** 20, 2 ** 63, 10 ** 400,
            10 ** 5000, -10 ** 5000,
            float(low), float(high), high + 0.5, 2.5, -0.0, 1e20, 1e300, math.inf, -math.inf, math.nan,
            True, False,
            str(high), f" {low} ", f"{high}.0", "1e3", "2.5", "1e5000", "-1e5000", str(10 ** 20 + 1), "9" * 5000,
            "abc", "", "nan", "inf", "0x10",
            np.int64(high), np.int64(high + 1), np.float64(low), np.float32(2.5), np.bool_(True),
            None, [1]]


def denoted(v) -> Fraction | None:
    """The number ``v`` stands for, exactly; None for what is not a number (a bool, text that is no decimal)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    if isinstance(v, float):
        return Fraction(v) if math.isfinite(v) else None
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)   # a 5000-digit text is still a number
    try:
        return Fraction(v.strip() if isinstance(v, str) else v)
    except ValueError:
        return None
    finally:
        sys.set_int_max_str_digits(limit)


def within(name: str, n: int) -> bool:
    low, high = BOUNDS[name]
    if name == "resolution":
        return n == 0 or 16 <= n <= high
    return low <= n <= high


def test_every_int_field_has_a_bound():
    assert sorted(INT_FIELDS) == sorted(BOUNDS)


@pytest.mark.parametrize("name", INT_FIELDS)
def test_an_int_field_keeps_exact_ints_and_refuses_what_its_bound_does_not_hold(name):
    low, high = BOUNDS[name]
    for v in inputs(low, high):
        number = denoted(v)
        if number is None or number.denominator != 1:
            with pytest.raises(ConfigError, match=rf"^{name}=.* is not a whole number$"):
                TrialConfig.check_value(name, v)
            continue
        n = int(number)
        if not within(name, n):
            with pytest.raises(ConfigError) as refused:
                TrialConfig.check_value(name, v)
            message = str(refused.value)
            assert message.startswith(f"{name}=") and len(message) < 200 and "\n" not in message, message
            if n > high:
                assert f"above the limit {high}" in message, message
            else:
                assert f">= {16 if name == 'resolution' else low}" in message, message
            continue
        got = TrialConfig.check_value(name, v)
        assert type(got) is int and got == n, (v, got)
        built = TrialConfig.from_dict({name: v})
        assert getattr(built, name) == n and type(getattr(built, name)) is int


def test_a_whole_number_is_never_rounded_through_a_float():
    # Past 2**53 a float cannot hold every whole number: a value one above a float's must stay itself.
    with pytest.raises(ConfigError, match=rf"^seed={10 ** 20 + 1} is above the limit {2 ** 32 - 1}"):
        TrialConfig.check_value("seed", 10 ** 20 + 1)
    with pytest.raises(ConfigError, match=rf"^seed={10 ** 20 + 1} is above the limit"):
        TrialConfig.check_value("seed", str(10 ** 20 + 1))
    with pytest.raises(ConfigError, match=r"^seed='1e30' is above the limit 4294967295 \(MAX_SEED"):
        TrialConfig.check_value("seed", "1e30")
    with pytest.raises(ConfigError, match=r"^seed=<a number of 5001 digits> is above the limit 4294967295"):
        TrialConfig.check_value("seed", 10 ** 5000)
