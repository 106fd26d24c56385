import pytest
import torch

from sfd_scale.device import resolve_device


def test_names_resolve_to_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_setting():
    with pytest.raises(ValueError, match=r"device is 'cuda' but no GPU is available \(use device=cpu or auto\)"):
        resolve_device("cuda", key="device")
    with pytest.raises(ValueError, match="train.device is 'cuda:1'"):
        resolve_device("cuda:1")
