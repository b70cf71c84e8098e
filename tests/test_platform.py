"""The decision table of pocketlm.loading.choose.choose, with invented machines (no hardware needed)."""

from __future__ import annotations

import pytest

from pocketlm.backends.ctranslate2 import CT2Facts
from pocketlm.backends.llama_cpp import LlamaFacts
from pocketlm.backends.llama_cpp import gpu_backend as llama_gpu_backend
from pocketlm.converters.core.errors import ModelLoadError
from pocketlm.loading.choose import choose
from pocketlm.loading.facts import ModelFacts, PlatformFacts

GIB = 2**30
BLOOM_GGUF = ModelFacts("gguf", "bloom", "q4_k_m", 400 << 20)
T5_INT8 = ModelFacts("ct2", "t5", "int8", 80 << 20)
T5_F32 = ModelFacts("ct2", "t5", "float32", 300 << 20)


def machine(llama_gpu=None, ct2_cuda_devices=0, ct2_cpu_compute=frozenset({"int8", "int8_float32", "float32"}), **kw):
    """A machine; the engines' facts are what each backend's probe would report."""
    base = dict(
        system="Linux",
        machine="x86_64",
        physical_cores=8,
        usable_cpus=16,
        ram_bytes=32 * GIB,
        cpu_features=frozenset({"avx2", "fma"}),
        nvidia_gpu=bool(ct2_cuda_devices) or llama_gpu == "cuda",
    )
    base.update(kw)
    engines = {"llama.cpp": LlamaFacts(llama_gpu), "ctranslate2": CT2Facts(ct2_cuda_devices, ct2_cpu_compute)}
    return PlatformFacts(**base, engines=engines)


MAC_M2 = machine(system="Darwin", machine="arm64", llama_gpu="metal", cpu_features=frozenset({"neon"}))
INTEL_MAC_METAL = machine(system="Darwin", machine="x86_64", llama_gpu="metal")
MAC_M2_CPU_BUILD = machine(system="Darwin", machine="arm64", cpu_features=frozenset({"neon"}))
CUDA_BOX = machine(llama_gpu="cuda", ct2_cuda_devices=1)
CUDA_ONLY_CT2 = machine(ct2_cuda_devices=2)  # CTranslate2 sees the GPU; llama.cpp was built CPU-only


def test_cpu_only_gguf_uses_physical_cores():
    c = choose(BLOOM_GGUF, machine())
    assert (c.backend, c.device, c.threads, c.n_gpu_layers, c.format) == ("llama.cpp", "cpu", 8, 0, "gguf")
    assert any("physical core" in r for r in c.reasons) and not c.warnings


def test_threads_never_exceed_usable_cpus():
    assert choose(BLOOM_GGUF, machine(physical_cores=8, usable_cpus=2)).threads == 2


def test_apple_silicon_with_metal_offloads_every_layer():
    c = choose(BLOOM_GGUF, MAC_M2)
    assert (c.device, c.n_gpu_layers) == ("metal", -1)


def test_metal_build_on_intel_mac_stays_on_cpu():
    c = choose(BLOOM_GGUF, INTEL_MAC_METAL)
    assert c.device == "cpu" and any("not Apple Silicon" in r for r in c.reasons)


def test_apple_silicon_without_metal_build_says_what_would_be_better():
    c = choose(BLOOM_GGUF, MAC_M2_CPU_BUILD)
    assert c.device == "cpu" and any("Metal build would use the GPU" in r for r in c.reasons)


def test_cuda_build_of_llama_cpp_uses_the_gpu():
    c = choose(BLOOM_GGUF, CUDA_BOX)
    assert (c.device, c.n_gpu_layers) == ("cuda", -1)


def test_cuda_visible_to_ctranslate2_but_not_to_llama_cpp():
    gguf = choose(BLOOM_GGUF, CUDA_ONLY_CT2)
    assert gguf.device == "cpu" and any("NVIDIA GPU is present" in r for r in gguf.reasons)
    ct2 = choose(T5_INT8, CUDA_ONLY_CT2)
    assert (ct2.backend, ct2.device, ct2.compute_type) == ("ctranslate2", "cuda", "int8_bfloat16")


def test_ct2_on_cuda_avoids_float16():
    assert choose(T5_F32, CUDA_BOX).compute_type == "bfloat16"


def test_ct2_cpu_compute_follows_the_model_and_the_build():
    assert choose(T5_INT8, machine()).compute_type == "int8"
    assert choose(T5_F32, machine()).compute_type == "float32"
    int16 = choose(ModelFacts("ct2", "t5", "int16", 1), machine())
    assert int16.compute_type == "float32" and any("not supported by this CPU build" in r for r in int16.reasons)
    no_int8 = choose(T5_INT8, machine(ct2_cpu_compute=frozenset({"float32"})))
    assert no_int8.compute_type == "float32"


def test_old_x86_cpu_without_avx2_is_explained():
    c = choose(T5_INT8, machine(cpu_features=frozenset({"avx"})))
    assert c.compute_type == "int8" and any("lacks AVX2" in r for r in c.reasons)


def test_low_ram_warns():
    small = machine(ram_bytes=1 * GIB)
    assert choose(ModelFacts("gguf", "bloom", "f16", 1 * GIB), small).warnings
    # an int8 CTranslate2 model computed in float32 needs 4x its size
    assert choose(ModelFacts("ct2", "t5", "int8", 300 << 20), small, device="cpu").warnings == []
    forced_f32 = choose(ModelFacts("ct2", "t5", "float16", 500 << 20), small)
    assert forced_f32.compute_type == "float32" and forced_f32.warnings


def test_checkpoint_folders_pick_a_conversion():
    bloom = choose(ModelFacts("hf", "bloom", None, 1 * GIB), machine())
    assert (bloom.format, bloom.quant, bloom.backend) == ("gguf", "q4_k_m", "llama.cpp")
    t5 = ModelFacts("hf", "t5", None, 300 << 20)
    cpu = choose(t5, machine())
    assert (cpu.format, cpu.quant, cpu.backend, cpu.compute_type) == ("ct2", "int8", "ctranslate2", "int8")
    assert any("convert the checkpoint" in r for r in cpu.reasons) and any("seq2seq on CPU" in r for r in cpu.reasons)
    mac = choose(t5, MAC_M2)
    assert (mac.format, mac.device) == ("gguf", "metal")
    cuda = choose(t5, CUDA_ONLY_CT2)
    assert (cuda.format, cuda.quant, cuda.device, cuda.compute_type) == ("ct2", "int8", "cuda", "int8_bfloat16")
    forced = choose(t5, machine(), backend="llama.cpp")
    assert (forced.format, forced.quant, forced.backend) == ("gguf", "q8_0", "llama.cpp")
    assert choose(ModelFacts("hf", "t5", "float32", 1), machine(), backend="ct2").compute_type == "float32"


def test_gguf_t5_runs_on_llama_cpp_like_any_gguf():
    c = choose(ModelFacts("gguf", "t5", "q8_0", 80 << 20), MAC_M2)
    assert (c.backend, c.device) == ("llama.cpp", "metal")


def test_overrides():
    assert choose(BLOOM_GGUF, CUDA_BOX, device="cpu").device == "cpu"
    assert choose(BLOOM_GGUF, machine(), threads=3).threads == 3
    assert choose(BLOOM_GGUF, machine(), backend="llama.cpp").backend == "llama.cpp"
    with pytest.raises(ModelLoadError, match="GGML_CUDA=on"):
        choose(BLOOM_GGUF, machine(), device="cuda")
    with pytest.raises(ModelLoadError, match="GGML_METAL=on"):
        choose(BLOOM_GGUF, MAC_M2_CPU_BUILD, device="metal")
    with pytest.raises(ModelLoadError, match="unknown device"):
        choose(BLOOM_GGUF, machine(), device="tpu")
    with pytest.raises(ModelLoadError, match="cannot run a gguf model"):
        choose(BLOOM_GGUF, machine(), backend="ctranslate2")
    with pytest.raises(ModelLoadError, match="no Metal backend"):
        choose(T5_INT8, MAC_M2, device="metal")
    with pytest.raises(ModelLoadError, match="sees no CUDA device"):
        choose(T5_INT8, machine(), device="cuda")
    with pytest.raises(ModelLoadError, match="cannot be converted for ctranslate2"):
        choose(ModelFacts("hf", "bloom"), machine(), backend="ct2")
    with pytest.raises(ModelLoadError, match="unknown backend"):
        choose(BLOOM_GGUF, machine(), backend="onnx")


def test_gpu_backend_parsing():
    assert llama_gpu_backend("CPU : AVX2 = 1 | ", offload=False) is None
    assert llama_gpu_backend("Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 |", offload=True) == "metal"
    assert llama_gpu_backend("CUDA : ARCHS = 860 | CPU : AVX2 = 1 |", offload=True) == "cuda"
