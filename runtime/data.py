"""Training data: synthetic token sequences, byte-level tokens from text files, or a token folder.

Batch `step` is a pure function of (seed, step) (for a token folder: of the seed and the global
sample number, which checkpoints record: runtime/token_data.py), and every plan sees the same global
batch, which the equivalence tests rely on. Each rank then takes its data-parallel rows (a token
folder reads only those) and its sequence shard (tp inside sp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from perfmodel.specs import ModelSpec, SpecError
from runtime.groups import Parallel
from runtime.token_data import TokenBatches, check_same_data, is_token_dir


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

    def identity(self) -> dict:
        return plain_identity(self.text is not None)

    def position(self, step: int) -> dict:
        return {"consumed_samples": step * self.global_batch}

    def resume(self, saved_identity: dict | None, saved_position: dict | None, step: int, where: str) -> None:
        check_same_data(saved_identity, self.identity(), where)  # batches follow from the step alone


def plain_identity(from_files: bool) -> dict:
    """What a checkpoint records to refuse a resume on other data: for text files only that they are
    text (their bytes are not hashed), else synthetic."""
    return {"kind": "bytes" if from_files else "synthetic"}


def open_data(paths: list[str], vocab: int, seq_len: int, global_batch: int, seed: int,
              verify_hash: bool = False) -> Data | TokenBatches:
    """A token folder (one path, written by `moeperf data prepare`), text files (bytes) or synthetic (none)."""
    folders = [p for p in paths if is_token_dir(p)]
    if folders and len(paths) > 1:
        raise SpecError(f"--data: {folders[0]} is a token folder; pass it alone")
    if folders:
        return TokenBatches(folders[0], seq_len, global_batch, seed, verify_hash)
    if paths:
        return Data.from_files(paths, vocab, seq_len, global_batch, seed)
    return Data(vocab, seq_len, global_batch, seed)


def check_for_launch(paths: list[str], model: ModelSpec, global_batch: int, seed: int,
                     resume_meta: dict | None, where: str = "") -> None:
    """Before launching: the data is readable and intact (a token folder's SHA-256 too), its ids fit the
    model's vocabulary, it holds a global batch, and a resumed checkpoint was trained on it."""
    for p in paths:
        if not Path(p).exists():
            raise SpecError(f"--data: {p}: no such file or folder")
    if any(is_token_dir(p) for p in paths):
        data = open_data(paths, model.vocab, model.seq_len, global_batch, seed, verify_hash=True)
        assert isinstance(data, TokenBatches)
        if data.index.vocab_size > model.vocab:
            raise SpecError(f"--data: {data.folder} was tokenized with {data.index.vocab_size} token ids "
                            f"({data.index.tokenizer.get('source')}) but model {model.name} has vocab "
                            f"{model.vocab}; use a model with vocab >= {data.index.vocab_size} (its YAML's "
                            "`vocab`, after --scale)")
        identity = data.identity()
    else:  # text files are read by the ranks (as before); nothing here needs their bytes
        identity = plain_identity(bool(paths))
    if resume_meta is not None:
        check_same_data(resume_meta.get("data"), identity, where)


def step_batch(data: Data | TokenBatches, step: int, par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, targets) of step `step`."""
    if isinstance(data, TokenBatches):
        return sequence_shard(torch.from_numpy(data.rows(step, par.size("dp"), par.index("dp"))), par)
    return local_batch(data.batch(step), par)


def local_batch(batch: torch.Tensor, par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, targets): its data-parallel rows and its sequence shard."""
    dp, di = par.size("dp"), par.index("dp")
    return sequence_shard(batch.chunk(dp, dim=0)[di], par)


def sequence_shard(rows: torch.Tensor, par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of this rank's slice of each sequence of rows [n, seq_len + 1]."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    i, n = par.token_shard
    return inputs.chunk(n, dim=1)[i].contiguous(), targets.chunk(n, dim=1)[i].contiguous()
