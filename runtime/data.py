"""Training data: synthetic token sequences or byte-level tokens from text files.

Batch `step` is a pure function of (seed, step): resuming at step n needs no saved reader
position, and every plan sees the same global batch, which the equivalence tests rely on.
Each rank then takes its data-parallel rows and its sequence shard (tp inside sp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from perfmodel.specs import SpecError
from runtime.groups import Parallel


@dataclass
class Data:
    vocab: int
    seq_len: int
    global_batch: int
    seed: int
    text: torch.Tensor | None = None  # all files' bytes, concatenated

    @staticmethod
    def from_files(paths: list[str], vocab: int, seq_len: int, global_batch: int, seed: int) -> Data:
        chunks = []
        for p in paths:
            path = Path(p)
            if not path.exists():
                raise SpecError(f"--data: {p}: no such file or folder")
            files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
            chunks += [f.read_bytes() for f in files]
        blob = b"\n".join(chunks)
        if len(blob) < seq_len + 2:
            raise SpecError(f"--data: {len(blob)} bytes of text is shorter than one sequence (seq_len={seq_len})")
        text = torch.frombuffer(bytearray(blob), dtype=torch.uint8).long() % vocab
        return Data(vocab, seq_len, global_batch, seed, text)

    def batch(self, step: int) -> torch.Tensor:
        """[global_batch, seq_len + 1] token ids of iteration `step`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n, s = self.global_batch, self.seq_len + 1
        if self.text is not None:
            starts = torch.randint(0, len(self.text) - s + 1, (n,), generator=g)
            return self.text[starts[:, None] + torch.arange(s)[None, :]]
        # synthetic: arithmetic progressions mod vocab with a random start and stride, so a model
        # can learn them (loss falls) while every token id still occurs
        start = torch.randint(0, self.vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        return (start + stride * torch.arange(s)[None, :]) % self.vocab


def local_batch(batch: torch.Tensor, par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, targets): its data-parallel rows and its sequence shard."""
    dp, di = par.size("dp"), par.index("dp")
    rows = batch.chunk(dp, dim=0)[di]
    inputs, targets = rows[:, :-1], rows[:, 1:]
    i, n = par.token_shard
    return inputs.chunk(n, dim=1)[i].contiguous(), targets.chunk(n, dim=1)[i].contiguous()
