from __future__ import annotations

import pytest

from qrexec_trio._config import Timeouts


def test_defaults_follow_the_reference() -> None:
    timeouts = Timeouts()
    assert timeouts.data_vchan_accept == 10.0
    assert timeouts.data_vchan_connect == 120.0
    assert timeouts.startup == 60.0


def test_environment_overrides_each_field() -> None:
    env = {"QREXEC_TIMEOUT_HANDSHAKE": "2.5", "QREXEC_STARTUP_TIMEOUT": "7"}
    timeouts = Timeouts.from_env(env)
    assert timeouts.handshake == 2.5
    assert timeouts.startup == 7.0
    assert timeouts.cleanup == Timeouts().cleanup


def test_bad_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="QREXEC_TIMEOUT_CLEANUP='soon' is not a number"):
        Timeouts.from_env({"QREXEC_TIMEOUT_CLEANUP": "soon"})
