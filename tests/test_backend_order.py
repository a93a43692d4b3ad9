"""Which implementation ``backend="auto"`` runs, pinned for every device and installation.

Four implementations of one formula each have a role (README, "Backends"): Triton is the CUDA
kernel, the C++ extension the CPU kernel and the CUDA fallback when Triton is not importable,
pure PyTorch the fallback of last resort; the Triton interpreter is for tests only.
"""

from __future__ import annotations

import pytest
import torch

from lsr_fused import policy


@pytest.fixture
def installation(monkeypatch):
    """Pretend an installation: which of Triton and the C++ extension (per device) are usable."""

    def configure(triton: bool, cpp_devices: tuple[str, ...], interpreted: bool = False):
        def triton_usable(device):
            return triton and (device.type == "cuda" or interpreted)

        monkeypatch.setattr(policy, "triton_usable", triton_usable)
        monkeypatch.setattr(policy, "_cpp_usable", lambda device_type: device_type in cpp_devices)

    return configure


CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("triton", "cpp_devices", "device", "expected"),
    [
        (True, ("cpu", "cuda"), CUDA, ["triton", "cpp", "torch"]),
        (False, ("cpu", "cuda"), CUDA, ["cpp", "torch"]),  # the CUDA C++ kernels' role
        (False, ("cpu",), CUDA, ["torch"]),
        (True, ("cpu",), CUDA, ["triton", "torch"]),
        (True, ("cpu", "cuda"), CPU, ["cpp", "torch"]),
        (False, (), CPU, ["torch"]),
    ],
)
def test_auto_prefers_in_this_order(installation, triton, cpp_devices, device, expected):
    installation(triton, cpp_devices)
    assert policy.available_backends(device) == expected
    assert policy.resolve_backend("auto", device) == expected[0]


def test_interpreter_is_listed_last_and_never_automatic(installation):
    installation(True, ("cpu",), interpreted=True)
    assert policy.available_backends(CPU) == ["cpp", "torch", "triton"]
    assert policy.resolve_backend("auto", CPU) == "cpp"
    assert policy.resolve_backend("triton", CPU) == "triton"


def test_unavailable_explicit_choice_names_the_backend(installation):
    installation(False, ("cpu",))
    with pytest.raises(ValueError, match="backend='triton'"):
        policy.resolve_backend("triton", CUDA)


@pytest.mark.parametrize(
    ("backend", "device", "triton", "expected"),
    [
        ("auto", CUDA, True, "triton"),
        ("auto", CUDA, False, "torch"),  # the C++ extension has no sharded kernels
        ("cpp", CUDA, True, "torch"),
        ("auto", CPU, True, "torch"),
        ("torch", CUDA, True, "torch"),
    ],
)
def test_sharded_loss_choice(installation, backend, device, triton, expected):
    installation(triton, ("cpu", "cuda"))
    assert policy.resolve_backend(backend, device, sharded=True) == expected
