"""The shared argument checks: TypeError for a wrong type, ValueError for a bad value, the caller named."""

import pytest
import torch

from arnn_plugins.checks import (
    check_choice,
    check_device,
    check_image,
    check_int,
    check_odd_kernel,
    check_query,
    check_swap_mode,
)


def test_check_int():
    assert check_int("Layer", "n", 3) == 3
    assert check_int("Layer", "n", 0, minimum=0) == 0
    for bad in (1.5, "2", True, None):
        with pytest.raises(TypeError, match=r"Layer: n must be an int >= 1"):
            check_int("Layer", "n", bad)
    with pytest.raises(ValueError, match=r"Layer: n must be an int >= 2, got 1"):
        check_int("Layer", "n", 1, minimum=2)


def test_check_odd_kernel_and_choices():
    assert check_odd_kernel("Layer", "k", 3) == 3
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="Layer: k must be an odd int >= 1"):
            check_odd_kernel("Layer", "k", bad)
    with pytest.raises(TypeError):
        check_odd_kernel("Layer", "k", 3.0)
    check_choice("Layer", "mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"Layer: mode must be one of \('a', 'b'\), got 'c'"):
        check_choice("Layer", "mode", "c", ("a", "b"))
    check_swap_mode("swap", "replace")
    with pytest.raises(ValueError, match=r"swap: mode must be one of \('residual', 'replace'\)"):
        check_swap_mode("swap", "add")


def test_check_image_names_layer_and_expected_shape():
    check_image("L", torch.zeros(2, 3, 4, 5), 3)
    check_image("L", torch.zeros(2, 7, 4, 5), None)
    with pytest.raises(TypeError, match=r"L: expected input a torch.Tensor of shape \(B, 3, H, W\), got list"):
        check_image("L", [1.0], 3)
    with pytest.raises(TypeError, match=r"L: expected a floating point input .* got dtype torch.int64"):
        check_image("L", torch.zeros(2, 3, 4, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"L: expected a 4-D input of shape \(B, 3, H, W\), got shape \(3, 4, 5\)"):
        check_image("L", torch.zeros(3, 4, 5), 3)
    with pytest.raises(ValueError, match=r"L: expected features of shape \(B, 3, h, w\) \(3 channels\)"):
        check_image("L", torch.zeros(2, 4, 4, 5), 3, "features", spatial="h, w")
    with pytest.raises(ValueError, match="L: expected a non-empty input"):
        check_image("L", torch.zeros(2, 3, 0, 5), 3)
    check_image("L", torch.zeros(0, 3, 4, 5), 3, allow_empty=True)


def test_check_query():
    check_query("L", None, 2, 0)
    check_query("L", torch.zeros(2, 5), 2, 5)
    with pytest.raises(ValueError, match="built with query_channels=0"):
        check_query("L", torch.zeros(2, 5), 2, 0)
    with pytest.raises(ValueError, match=r"L: a query of shape \(2, 5\) is required"):
        check_query("L", None, 2, 5)
    with pytest.raises(TypeError, match=r"L: expected a floating point query tensor of shape \(2, 5\), got dtype"):
        check_query("L", torch.zeros(2, 5, dtype=torch.long), 2, 5)
    with pytest.raises(ValueError, match=r"L: expected query of shape \(2, 5\), got shape \(3, 5\)"):
        check_query("L", torch.zeros(3, 5), 2, 5)


def test_check_device():
    check_device(None)
    check_device("cpu")
    with pytest.raises(ValueError, match="--device must be cpu or cuda, got 'tpu'"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            check_device("cuda")
