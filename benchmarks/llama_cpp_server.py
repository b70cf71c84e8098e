"""llama-cpp-python's own OpenAI server, as the baseline of serve_bench.py.

Run with the same llama.cpp settings PocketLM uses: on CPUs that report AMX, llama.cpp's
extra buffer types stay off (their kernels SIGSEGV under this project's hypervisor, see
runtime/backends/llama_common.py), which the server has no option for.
"""

import runpy

import llama_cpp.llama_cpp as C

from pocketlm.backends.llama_common import extra_buffer_types

default_params = C.llama_model_default_params


def model_params():  # type: ignore[no-untyped-def]
    params = default_params()
    params.use_extra_bufts = extra_buffer_types()
    return params


C.llama_model_default_params = model_params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
