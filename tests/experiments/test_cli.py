"""experiments.cli: what every entry point shares about its command line."""

import pytest

from experiments import cli


def test_require_names_the_missing_package_and_the_extra():
    with pytest.raises(SystemExit) as e:
        cli.require("numpy", "no_such_module_xyz", extra="bench")
    assert "needs no_such_module_xyz, not installed: pip install -e '.[bench]'" in str(
        e.value.code)
    assert "numpy" not in str(e.value.code)


def test_require_passes_when_installed():
    cli.require("numpy", extra="bench")  # returns, no exit
