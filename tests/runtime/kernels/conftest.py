"""Kernel tests run Triton in its CPU interpreter, in fp32 (the interpreter mishandles bf16)."""

import os

# Must happen before triton.jit defines the kernels; enable_interpreter also covers the case
# where another test module imported runtime.kernels first.
os.environ["TRITON_INTERPRET"] = "1"

from runtime.kernels._backend import enable_interpreter  # noqa: E402

enable_interpreter()
