"""Compile every kernel for an H100 (sm_90) without a GPU and print a JSON verdict per kernel.

Run in its own process by test_kernels_compile_sm90.py, because the test session has
TRITON_INTERPRET=1 and the interpreter's patches to triton.language break the real compiler.
Arguments are specialised the way the JIT does at launch (unit strides as constants,
16-divisible sizes and pointers), so "uses wgmma / a cp.async pipeline" means what it says.
"""

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import compiler  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
H100 = GPUTarget("cuda", 90, 32)
gg, sw, pm, f8 = (importlib.import_module(f"runtime.kernels.{m}") for m in ("grouped_gemm", "swiglu", "permute", "fp8"))
DIV16 = [["tt.divisibility", 16]]


def _compile(kernel, sig: dict, consts: dict, div16: tuple = (), num_warps: int = 4, num_stages: int = 3):
    names = kernel.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    missing = [n for n in names if n not in sig and n not in consts]
    assert not missing, f"no type given for {missing}"
    src = compiler.ASTSource(fn=kernel, signature=signature,
                             constexprs={(names.index(k),): v for k, v in consts.items()},
                             attrs={(names.index(n),): DIV16 for n in div16})
    return triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


GG_SIG = dict(offs_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", M="i32", N="i32", K="i32", E="i32",
              stride_am="i32", stride_be="i32", stride_cm="i32", stride_sbe="i32")
TMA_SIG = dict(offs_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", M="i32", N="i32", K="i32", E="i32",
               stride_cm="i32", stride_sbe="i32")
TMA_DIV = ("a_ptr", "b_ptr", "c_ptr", "offs_ptr", "N", "K", "stride_cm")
GG_DIV = ("a_ptr", "b_ptr", "c_ptr", "offs_ptr", "N", "K", "stride_am", "stride_be", "stride_cm")


def cases() -> dict:
    bf, i32 = "*bf16", "i32"
    tma_consts = dict(PRECISION="tf32", BLOCK_M=128, BLOCK_N=256, GROUP_M=8, E_POW2=32)
    gemm_consts = dict(stride_ak=1, stride_cn=1, PRECISION="tf32", BLOCK_M=128, BLOCK_N=256, GROUP_M=8, E_POW2=32, EVEN_K=True)
    return {
        # bf16: W [E, K, N] row-major (unit stride along N)
        "gemm_fwd_bf16": (gg._gg_fwd_kernel, dict(GG_SIG, a_ptr=bf, b_ptr=bf, c_ptr=bf, stride_bk=i32),
                          dict(gemm_consts, stride_bn=1, HAS_SCALES=False, BLOCK_K=64), GG_DIV + ("stride_bk",), 8, 3),
        # fp8: W stored [E, N, K] (unit stride along K), per-row x per-column scales
        "gemm_fwd_fp8": (gg._gg_fwd_kernel, dict(GG_SIG, a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", c_ptr=bf, stride_bn=i32),
                         dict(gemm_consts, stride_bk=1, HAS_SCALES=True, BLOCK_K=128), GG_DIV + ("stride_bn",), 8, 3),
        # TMA loads (Hopper bulk tensor copies): W [E, K, N] (bf16 fwd) and [E, N, K] (dgrad, fp8)
        "gemm_fwd_tma_bf16": (gg._gg_fwd_tma_kernel, dict(TMA_SIG, a_ptr=bf, b_ptr=bf, c_ptr=bf),
                              dict(tma_consts, B_TRANS=False, HAS_SCALES=False, BLOCK_K=64), TMA_DIV, 8, 3),
        "gemm_dgrad_tma_bf16": (gg._gg_fwd_tma_kernel, dict(TMA_SIG, a_ptr=bf, b_ptr=bf, c_ptr=bf),
                                dict(tma_consts, B_TRANS=True, HAS_SCALES=False, BLOCK_K=64), TMA_DIV, 8, 3),
        "gemm_fwd_tma_fp8": (gg._gg_fwd_tma_kernel, dict(TMA_SIG, a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", c_ptr=bf),
                             dict(tma_consts, B_TRANS=True, HAS_SCALES=True, BLOCK_K=128), TMA_DIV, 8, 3),
        "gemm_wgrad": (gg._gg_wgrad_kernel,
                       dict(a_ptr=bf, g_ptr=bf, c_ptr=bf, offs_ptr="*i32", K=i32, N=i32, stride_am=i32,
                            stride_gm=i32, stride_ce=i32, stride_ck=i32),
                       dict(stride_ak=1, stride_gn=1, stride_cn=1, PRECISION="tf32", BLOCK_K=128, BLOCK_N=128,
                            BLOCK_M=64),
                       ("a_ptr", "g_ptr", "c_ptr", "K", "N", "stride_am", "stride_gm", "stride_ce", "stride_ck"), 4, 4),
        "swiglu_fwd": (sw._swiglu_fwd_kernel, dict(x_ptr=bf, y_ptr=bf, F_=i32, stride_xm=i32, stride_ym=i32),
                       dict(BLOCK=1024), (), 4, 3),
        "swiglu_bwd": (sw._swiglu_bwd_kernel, dict(x_ptr=bf, dy_ptr=bf, dx_ptr=bf, F_=i32, stride_xm=i32,
                                                   stride_dym=i32, stride_dxm=i32), dict(BLOCK=1024), (), 4, 3),
        "permute_scatter": (pm._scatter_rows_kernel, dict(x_ptr=bf, out_ptr=bf, map_ptr="*i64", H=i32, stride_x=i32,
                                                          stride_o=i32), dict(TOPK=8, BLOCK=1024), (), 4, 3),
        "unpermute_gather_sum": (pm._gather_sum_kernel, dict(y_ptr=bf, out_ptr=bf, map_ptr="*i64", p_ptr="*fp32",
                                                             H=i32, stride_y=i32, stride_o=i32),
                                 dict(HAS_P=True, TOPK=8, BLOCK=1024), (), 4, 3),
        "unpermute_bwd": (pm._unpermute_bwd_kernel, dict(dout_ptr=bf, y_ptr=bf, map_ptr="*i64", p_ptr="*fp32",
                                                         dy_ptr=bf, dp_ptr="*fp32", H=i32, stride_do=i32,
                                                         stride_y=i32, stride_dy=i32), dict(TOPK=8, BLOCK=1024),
                          (), 4, 3),
        "fp8_quant": (f8._quant_kernel, dict(x_ptr=bf, q_ptr="*fp8e4nv", s_ptr="*fp32", N=i32, GROUP=i32, stride_x=i32,
                                             stride_q=i32, stride_sm=i32, EPS="fp32", QMAX="fp32"),
                      dict(BLOCK=1024), (), 4, 3),
        "fp8_dequant": (f8._dequant_kernel, dict(q_ptr="*fp8e4nv", s_ptr="*fp32", y_ptr=bf, N=i32, GROUP=i32,
                                                 stride_q=i32, stride_sm=i32, stride_y=i32), dict(BLOCK=1024), (), 4, 3),
    }


@triton.jit
def _canary(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


def main() -> int:
    try:  # the AOT API (ASTSource signature/attrs) moves between triton releases: check it first
        _compile(_canary, dict(x_ptr="*fp32"), dict(BLOCK=128), ("x_ptr",))
    except (TypeError, KeyError, AttributeError, AssertionError) as exc:
        print(json.dumps({"_api_error": f"{type(exc).__name__}: {exc}"}))
        return 0
    out = {}
    for name, (kernel, sig, consts, div, warps, stages) in cases().items():
        try:
            ptx = _compile(kernel, sig, consts, div, warps, stages).asm["ptx"]
            out[name] = {"ok": True, "wgmma": "wgmma.mma_async" in ptx, "cp_async": "cp.async" in ptx,
                         "tma": "cp.async.bulk.tensor" in ptx}
        except Exception as exc:
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
