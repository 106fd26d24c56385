import pytest
import torch

from sfd_scale.device import device_peak_tflops, peak_tflops, resolve_device


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


def test_peak_tflops_by_device_name_and_precision():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0  # the SXM part
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # a variant before its SXM entry
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5  # no TF32: the fp32 units
        torch.set_float32_matmul_precision("high")
        assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # fp32 matmuls on TF32 tensor cores
    finally:
        torch.set_float32_matmul_precision(before)
    assert peak_tflops("Tesla T4", "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert device_peak_tflops(torch.device("meta"), "fp32") is None
