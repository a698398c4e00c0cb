"""Issue-15 regressions (adversarial run, new-user trial): configuration."""

from __future__ import annotations

import pytest

from dreampool_gpu import PoolConfig
from dreampool_gpu.errors import (
    InvalidConfigurationError,
)


def test_config_replace_unknown_field():
    with pytest.raises(InvalidConfigurationError, match="bogus"):
        PoolConfig().replace(bogus=1)
