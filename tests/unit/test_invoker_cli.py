"""The invoker's command line refuses a device it cannot use before it starts anything."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from invoker.__main__ import main
from invoker.warmup import warm_up


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_one_is_refused_with_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["--device", "cuda:0"])
    assert result.exit_code == 2
    assert "--device" in result.output and "no CUDA device" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_warm_up_names_a_cuda_device_it_cannot_use() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        warm_up("cuda:0")
