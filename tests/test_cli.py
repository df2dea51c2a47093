"""How every script reads the shared rope flags (yarn_minimal.cli)."""
import argparse

import pytest

from yarn_minimal.cli import add_rope_args, rope_from_args
from yarn_minimal.rope import RopeConfig


def parse(*argv):
    p = argparse.ArgumentParser()
    add_rope_args(p)
    return p.parse_args(list(argv))


PLAIN = RopeConfig(original_length=256)
TUNED = RopeConfig(method="yarn", scale=16.0, original_length=4096)  # e.g. a released YaRN model


@pytest.mark.parametrize("argv, base, expected", [
    ((), PLAIN, PLAIN),
    (("--yarn-scale", "16"), PLAIN, RopeConfig(method="yarn", scale=16.0, original_length=256)),
    (("--dynamic",), PLAIN, RopeConfig(method="yarn", dynamic=True, original_length=256)),
    (("--method", "pi", "--scale", "4", "--dynamic"), PLAIN, RopeConfig(method="pi", scale=4.0, dynamic=True, original_length=256)),
    (("--yarn-scale", "32"), TUNED, RopeConfig(method="yarn", scale=32.0, original_length=4096)),
    (("--method", "none"), TUNED, RopeConfig(method="none", scale=1.0, original_length=4096)),
    (("--method", "none"), RopeConfig(method="yarn", dynamic=True, original_length=4096), RopeConfig(original_length=4096)),
    (("--ramp", "paper", "--alpha", "0.5", "--beta", "16"), TUNED,
     RopeConfig(method="yarn", scale=16.0, original_length=4096, ramp="paper", alpha=0.5, beta=16.0)),
])
def test_flags_on_top_of_the_checkpoints_setting(argv, base, expected):
    assert rope_from_args(parse(*argv), base) == expected


def test_bad_flag_value_names_the_field():
    with pytest.raises(SystemExit, match="scale"):
        rope_from_args(parse("--yarn-scale", "0.5"), PLAIN)


@pytest.mark.parametrize("argv", [("--method", "none", "--yarn-scale", "16"), ("--method", "none", "--dynamic")])
def test_plain_rope_with_a_scale_is_refused(argv):
    # plain RoPE has no s: accepting one would make RopeConfig.window claim s L tokens
    with pytest.raises(SystemExit, match="method 'none'"):
        rope_from_args(parse(*argv), PLAIN)
