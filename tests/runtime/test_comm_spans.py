"""FP8 (de)quantization is profiled under its own op-graph names, so calibration prices it as
the memory op the simulator models (and not as all-to-all time)."""

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from runtime import comm


def test_fp8_all_to_all_records_quant_and_dequant_spans(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(16, 32)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y, _ = comm.all_to_all(x, [16], [16], wire="fp8", name="moe.dispatch_a2a/fwd")
            comm.all_to_all(x, [16], [16], wire="native", name="moe.combine_a2a/fwd")
        names = {e.name for e in prof.events()}
        assert {"moe.dispatch_quant/fwd", "moe.dispatch_dequant/fwd"} <= names
        assert "moe.combine_quant/fwd" not in names  # uncompressed: nothing to quantize
        assert torch.allclose(y, x, rtol=0.07, atol=1e-3)
    finally:
        dist.destroy_process_group()
