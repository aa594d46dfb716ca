"""Group-limited routing (DeepSeek-V2/V3 node-limited routing) in the runtime's router."""

from types import SimpleNamespace

import torch

from runtime.moe import MoE


def test_top_k_comes_from_the_best_groups_only():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 16), dim=-1)
    cfg = SimpleNamespace(expert_groups=4, groups_per_token=2)
    masked = MoE._group_limited(cfg, probs)
    idx = torch.topk(masked, 3, dim=-1).indices
    best_groups = torch.topk(probs.view(64, 4, 4).amax(-1), 2, dim=-1).indices
    for t in range(64):
        assert set((idx[t] // 4).tolist()) <= set(best_groups[t].tolist())
    # every chosen expert's probability is unchanged; without a limit nothing is masked
    assert torch.equal(masked.gather(-1, idx), probs.gather(-1, idx))
    assert MoE._group_limited(SimpleNamespace(expert_groups=1, groups_per_token=None), probs) is probs
