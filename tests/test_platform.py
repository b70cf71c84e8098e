"""Backend/device/thread choice as a pure function of platform facts (no hardware needed)."""

from __future__ import annotations

import pytest

from convert.errors import ModelLoadError
from runtime.platform import PlatformFacts, choose, llama_gpu_backend


def facts(**kw):
    base = dict(system="Linux", machine="x86_64", physical_cores=8, usable_cpus=16, ram_bytes=32 << 30, llama_gpu=None)
    base.update(kw)
    return PlatformFacts(**base)


def test_cpu_only_build_uses_physical_cores():
    c = choose("gguf", facts())
    assert (c.backend, c.device, c.threads, c.n_gpu_layers) == ("llama.cpp", "cpu", 8, 0)
    assert any("physical core" in r for r in c.reasons)


def test_threads_capped_by_affinity():
    assert choose("gguf", facts(physical_cores=8, usable_cpus=2)).threads == 2


def test_apple_silicon_with_metal_offloads_everything():
    c = choose("gguf", facts(system="Darwin", machine="arm64", llama_gpu="metal"))
    assert (c.device, c.n_gpu_layers) == ("metal", -1)


def test_metal_build_on_intel_mac_stays_on_cpu():
    c = choose("gguf", facts(system="Darwin", machine="x86_64", llama_gpu="metal"))
    assert c.device == "cpu" and any("not Apple Silicon" in r for r in c.reasons)


def test_apple_silicon_without_metal_build_says_what_to_install():
    c = choose("gguf", facts(system="Darwin", machine="arm64"))
    assert c.device == "cpu" and any("Metal build" in r for r in c.reasons)


def test_cuda_build_uses_gpu():
    c = choose("gguf", facts(llama_gpu="cuda"))
    assert (c.device, c.n_gpu_layers) == ("cuda", -1)


def test_overrides():
    assert choose("gguf", facts(llama_gpu="cuda"), device="cpu").device == "cpu"
    assert choose("gguf", facts(), threads=3).threads == 3
    with pytest.raises(ModelLoadError, match="GGML_CUDA=on"):
        choose("gguf", facts(), device="cuda")
    with pytest.raises(ModelLoadError, match="unknown device"):
        choose("gguf", facts(), device="tpu")


def test_gpu_backend_parsing():
    assert llama_gpu_backend("CPU : AVX2 = 1 | ", offload=False) is None
    assert llama_gpu_backend("Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 |", offload=True) == "metal"
    assert llama_gpu_backend("CUDA : ARCHS = 860 | CPU : AVX2 = 1 |", offload=True) == "cuda"
