"""Compile every kernel for an H100 (sm_90) without a GPU: Triton lowers to PTX and runs ptxas.

The CPU tests run the interpreter, which never type-checks loop-carried values, dot shapes or
fp8 conversions the way the compiler does; this catches those before a GPU run.  Arguments are
specialised the way the JIT does at launch (unit strides as constants, 16-divisible sizes), so
the checks that the GEMMs use wgmma and a cp.async pipeline mean what they say.
"""

import importlib
import os

import pytest
import triton

compiler = pytest.importorskip("triton.compiler")
try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover - very old triton
    pytest.skip("triton has no GPUTarget", allow_module_level=True)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
if not os.path.exists(PTXAS):
    pytest.skip("triton wheel ships no ptxas", allow_module_level=True)

H100 = GPUTarget("cuda", 90, 32)
gg, sw, pm, f8 = (importlib.import_module(f"runtime.kernels.{m}") for m in ("grouped_gemm", "swiglu", "permute", "fp8"))
DIV16 = [["tt.divisibility", 16]]


def _compile(kernel, sig: dict, consts: dict, div16: tuple = (), num_warps: int = 4, num_stages: int = 3):
    fn = getattr(kernel, "fn", kernel)  # the interpreter wraps the python function; re-jit it
    jit = triton.runtime.jit.JITFunction(fn)
    names = jit.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    missing = [n for n in names if n not in sig and n not in consts]
    assert not missing, f"test lists no type for {missing}"
    src = compiler.ASTSource(fn=jit, signature=signature,
                             constexprs={(names.index(k),): v for k, v in consts.items()},
                             attrs={(names.index(n),): DIV16 for n in div16})
    return triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


GG_SIG = dict(offs_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", M="i32", N="i32", K="i32", E="i32",
              stride_am="i32", stride_be="i32", stride_bk="i32", stride_cm="i32", stride_sbe="i32")
GG_DIV = ("a_ptr", "b_ptr", "c_ptr", "offs_ptr", "N", "K", "stride_am", "stride_be", "stride_bk", "stride_cm")


@pytest.mark.parametrize("dtype,has_scales,block_k", [("bf16", False, 64), ("fp8e4nv", True, 128)])
def test_grouped_gemm_forward_compiles_to_pipelined_wgmma(dtype, has_scales, block_k):
    sig = dict(GG_SIG, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr="*bf16")
    consts = dict(stride_ak=1, stride_bn=1, stride_cn=1, HAS_SCALES=has_scales, PRECISION="tf32",
                  BLOCK_M=128, BLOCK_N=256, BLOCK_K=block_k, GROUP_M=8, E_POW2=32)
    if dtype.startswith("fp8"):  # K-major weights for FP8: stride along K is the unit one
        consts.update(stride_ak=1, stride_bk=1, stride_bn=None)
        sig = {k: v for k, v in sig.items() if k != "stride_bk"} | {"stride_bn": "i32"}
        consts.pop("stride_bn")
    ptx = _compile(gg._gg_fwd_kernel, sig, consts, GG_DIV, num_warps=8, num_stages=3).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx


def test_grouped_gemm_wgrad_compiles():
    sig = dict(a_ptr="*bf16", g_ptr="*bf16", c_ptr="*bf16", offs_ptr="*i32", K="i32", N="i32", stride_am="i32",
               stride_gm="i32", stride_ce="i32", stride_ck="i32")
    consts = dict(stride_ak=1, stride_gn=1, stride_cn=1, PRECISION="tf32", BLOCK_K=128, BLOCK_N=128, BLOCK_M=64)
    ptx = _compile(gg._gg_wgrad_kernel, sig, consts, ("a_ptr", "g_ptr", "c_ptr", "K", "N", "stride_am",
                                                       "stride_gm", "stride_ce", "stride_ck"), 4, 4).asm["ptx"]
    assert "wgmma.mma_async" in ptx


@pytest.mark.parametrize("name", ["swiglu_fwd", "swiglu_bwd", "scatter", "gather_sum", "unpermute_bwd", "quant",
                                  "dequant"])
def test_elementwise_kernels_compile(name):
    bf, i32 = "*bf16", "i32"
    cases = {
        "swiglu_fwd": (sw._swiglu_fwd_kernel, dict(x_ptr=bf, y_ptr=bf, F_=i32, stride_xm=i32, stride_ym=i32)),
        "swiglu_bwd": (sw._swiglu_bwd_kernel, dict(x_ptr=bf, dy_ptr=bf, dx_ptr=bf, F_=i32, stride_xm=i32,
                                                   stride_dym=i32, stride_dxm=i32)),
        "scatter": (pm._scatter_rows_kernel, dict(x_ptr=bf, out_ptr=bf, map_ptr="*i64", H=i32, stride_x=i32,
                                                  stride_o=i32)),
        "gather_sum": (pm._gather_sum_kernel, dict(y_ptr=bf, out_ptr=bf, map_ptr="*i64", p_ptr="*fp32", H=i32,
                                                   stride_y=i32, stride_o=i32)),
        "unpermute_bwd": (pm._unpermute_bwd_kernel, dict(dout_ptr=bf, y_ptr=bf, map_ptr="*i64", p_ptr="*fp32",
                                                         dy_ptr=bf, dp_ptr="*fp32", H=i32, stride_do=i32,
                                                         stride_y=i32, stride_dy=i32)),
        "quant": (f8._quant_kernel, dict(x_ptr=bf, q_ptr="*fp8e4nv", s_ptr="*fp32", N=i32, GROUP=i32, stride_x=i32,
                                         stride_q=i32, stride_sm=i32, EPS="fp32", QMAX="fp32")),
        "dequant": (f8._dequant_kernel, dict(q_ptr="*fp8e4nv", s_ptr="*fp32", y_ptr=bf, N=i32, GROUP=i32,
                                             stride_q=i32, stride_sm=i32, stride_y=i32)),
    }
    kernel, sig = cases[name]
    consts = {"BLOCK": 1024} | ({"TOPK": 8} if "map_ptr" in sig else {}) | ({"HAS_P": True} if "p_ptr" in sig
                                                                            and name == "gather_sum" else {})
    _compile(kernel, sig, consts)
