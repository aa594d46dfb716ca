"""Tokenized training data on disk (written by `moeperf data prepare`) and the sequences a rank reads.

A token folder holds two files:

- `tokens.bin`: every document's token ids, each document followed by the end-of-document id, as raw
  little-endian uint16 (when every id fits: vocab_size <= 65,536) or uint32: nanoGPT's train.bin,
  Megatron's .bin without its per-document index.
- `index.json`: format/version, dtype, vocab_size, tokens, documents, eos_id/eos_token, the tokenizer
  (source and SHA-256 of its tokenizer.json), the source files (path, bytes, SHA-256, documents) and
  the .bin's bytes and SHA-256.

Sample j is tokens [j*seq_len, (j+1)*seq_len + 1): inputs and targets of one sequence, consecutive
samples sharing one boundary token (Megatron's layout; no token is skipped). Sequences cross document
boundaries; the EOS id marks them. Global sample g (counted from the start of training) is sample
perm_e(g mod n) of epoch e = g div n, where perm_e is a keyed bijection of [0, n) (a Feistel network
with cycle walking) seeded by (seed, e): a fresh shuffle per epoch that needs no index file and no
memory, so a step's samples are a pure function of (seed, global sample number). A step takes
global_batch consecutive global samples; data-parallel replica d of D takes its 1/D share of them in
order, so replicas read disjoint sequences and every tp/sp/pp/ep rank of one replica the same ones.
The data position (global samples consumed) goes into every checkpoint (`position`), and a resume
continues from it, on exactly the next token.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfmodel.specs import SpecError

BIN, INDEX = "tokens.bin", "index.json"
FORMAT, VERSION = "moeperf.tokens", 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_FEISTEL_ROUNDS = 4
_MASK64 = (1 << 64) - 1


def dtype_for(vocab_size: int) -> str:
    """The narrowest dtype holding every id below vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_token_dir(path: str | Path) -> bool:
    """A folder `moeperf data prepare` wrote (or meant to): it has tokens.bin or index.json."""
    p = Path(path)
    return p.is_dir() and ((p / BIN).exists() or (p / INDEX).exists())


def file_sha256(path: Path, progress=None) -> str:
    """SHA-256 of a file, read in 4 MiB pieces; progress(n_bytes) after each piece."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


@dataclass(frozen=True)
class TokenIndex:
    """index.json of a token folder."""
    dtype: str
    vocab_size: int
    tokens: int
    documents: int
    eos_id: int
    bin_bytes: int
    bin_sha256: str
    tokenizer: dict
    sources: list

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.__dict__}

    @staticmethod
    def read(folder: Path) -> TokenIndex:
        path = folder / INDEX
        if not path.is_file():
            raise SpecError(f"--data: {folder} has no {INDEX}; write the folder with `moeperf data prepare`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
            idx = TokenIndex(**{k: raw[k] for k in TokenIndex.__dataclass_fields__})
            ints = (idx.vocab_size, idx.tokens, idx.documents, idx.eos_id, idx.bin_bytes)
            if idx.dtype not in DTYPES or not all(isinstance(v, int) and v >= 0 for v in ints):
                raise ValueError("a field has the wrong type")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SpecError(f"--data: {path} is not a moeperf token index ({type(exc).__name__}: {exc}); "
                            "prepare the folder again with `moeperf data prepare`") from None
        if idx.bin_bytes != idx.tokens * DTYPES[idx.dtype].itemsize:
            raise SpecError(f"--data: {path} is inconsistent ({idx.tokens} {idx.dtype} tokens in {idx.bin_bytes} "
                            "bytes); prepare the folder again with `moeperf data prepare`")
        return idx


def check_folder(folder: Path, verify_hash: bool) -> TokenIndex:
    """The folder's index after checking tokens.bin against it: size always, SHA-256 when verify_hash
    (reads the whole file once, with a progress bar on a terminal for large files)."""
    idx = TokenIndex.read(folder)
    path = folder / BIN
    if not path.is_file():
        raise SpecError(f"--data: {path} is missing; prepare the folder again with `moeperf data prepare`")
    size = path.stat().st_size
    if size != idx.bin_bytes:
        raise SpecError(f"--data: {path} has {size} bytes but {INDEX} says {idx.bin_bytes} (truncated or "
                        "overwritten); prepare the folder again with `moeperf data prepare`")
    if verify_hash:
        with _progress(f"checking {path.name}", size) as advance:
            digest = file_sha256(path, advance)
        if digest != idx.bin_sha256:
            raise SpecError(f"--data: {path} fails its SHA-256 check against {INDEX} (corrupt); "
                            "prepare the folder again with `moeperf data prepare`")
    return idx


class _progress:
    """A transient rich progress bar over n bytes on a terminal's stderr for work over 256 MiB; else nothing."""

    def __init__(self, label: str, total_bytes: int, min_bytes: int = 1 << 28):
        self.label, self.total, self.prog = label, total_bytes, None
        self.show = total_bytes >= min_bytes and sys.stderr.isatty()

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.prog = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=True)
        self.prog.start()
        task = self.prog.add_task(self.label, total=self.total)
        return lambda n: self.prog.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.stop()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied to i (values in [0, n)): a balanced Feistel network on the
    smallest even-bit power-of-two domain >= n (< 4n), cycle-walking values that land outside [0, n)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, lo = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(int(_mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch * 4 + r) & _MASK64],
                                          dtype=np.uint64))[0])) for r in range(_FEISTEL_ROUNDS)]
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        for k in keys:
            left, right = y >> half, y & lo
            y = (right << half) | (left ^ (_mix64(right ^ k) & lo))
        x[todo] = y
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


class TokenBatches:
    """The samples of a token folder for a run: memory-mapped, read per step and data-parallel rank."""

    def __init__(self, folder: str | Path, seq_len: int, global_batch: int, seed: int, verify_hash: bool = False):
        self.folder = Path(folder)
        self.index = check_folder(self.folder, verify_hash)
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.samples = max(0, (self.index.tokens - 1) // seq_len)  # per epoch
        if self.samples < global_batch:
            raise SpecError(f"--data: {self.folder} holds {self.index.tokens} tokens, {self.samples} sequences of "
                            f"seq_len {seq_len} + 1, fewer than one global batch ({global_batch}); tokenize more "
                            "text or lower seq_len / plan.global_batch")
        self.tokens = np.memmap(self.folder / BIN, dtype=DTYPES[self.index.dtype], mode="r",
                                shape=(self.index.tokens,))
        self.first_sample = 0  # global sample number of step 1's first sample (set on resume)

    def identity(self) -> dict:
        """What a checkpoint records to refuse a resume on other data."""
        return {"kind": "tokens", "tokens": self.index.tokens, "bin_sha256": self.index.bin_sha256}

    def sample_of(self, step: int) -> int:
        """Global number of step `step`'s first sample (steps are 1-based)."""
        return self.first_sample + (step - 1) * self.global_batch

    def position(self, step: int) -> dict:
        """The data position after `step`: the next sample to read."""
        g = self.sample_of(step + 1)
        return {"consumed_samples": g, "consumed_tokens": g * self.seq_len, "epoch": g // self.samples,
                "sample_in_epoch": g % self.samples}

    def resume(self, saved_identity: dict | None, saved_position: dict | None, step: int, where: str) -> None:
        """Continue after checkpoint `where` taken after `step`; refuse one written on other data."""
        check_same_data(saved_identity, self.identity(), where)
        if saved_position is not None:
            self.first_sample = int(saved_position["consumed_samples"]) - step * self.global_batch

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global samples first .. first+count-1."""
        g = np.arange(first, first + count, dtype=np.int64)
        epoch, j = g // self.samples, g % self.samples
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(j[sel], self.samples, self.seed, int(e))
        return out * self.seq_len

    def rows(self, step: int, dp: int, dp_index: int) -> np.ndarray:
        """[global_batch / dp, seq_len + 1] token ids of replica dp_index's share of step `step`."""
        per = self.global_batch // dp
        starts = self.starts(self.sample_of(step) + dp_index * per, per)
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]], dtype=np.int64)


def describe(identity: dict | None) -> str:
    if not identity:
        return "unrecorded data"
    if identity.get("kind") == "tokens":
        return f"token data {str(identity.get('bin_sha256'))[:12]} ({identity.get('tokens')} tokens)"
    return f"{identity.get('kind')} data"


def check_same_data(saved: dict | None, current: dict, where: str) -> None:
    """A checkpoint written before the data was recorded (saved None) resumes on anything."""
    if saved is not None and saved != current:
        raise SpecError(f"--resume: checkpoint {where} was trained on {describe(saved)}, but this run reads "
                        f"{describe(current)}; resume with the same --data or start a new --out")
