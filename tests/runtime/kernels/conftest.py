"""Kernel tests run Triton in its CPU interpreter, in fp32 (the interpreter mishandles bf16)."""

import os

# Must happen before anything imports triton (this directory is collected before the other
# runtime tests); enable_interpreter fails with a clear message if it is already too late.
os.environ["TRITON_INTERPRET"] = "1"

from runtime.kernels._backend import enable_interpreter  # noqa: E402

enable_interpreter()
