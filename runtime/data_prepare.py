"""`moeperf data prepare`: tokenize text files into a token folder (runtime/token_data.py) for `moeperf run --data`.

    moeperf data prepare --tokenizer PATH_OR_NAME --input FILES... --out DIR [--eos TOKEN] [--text-key text]

The tokenizer is a Hugging Face tokenizer.json (a file, a folder holding one, or a model name found in
the local Hugging Face cache: nothing is downloaded). A .jsonl input holds one document per line (its
`--text-key` field); any other file is one document. Every document is followed by the EOS id. Text is
read in pieces cut at line ends and tokenized in batches (the tokenizers library's threads), streaming
into tokens.bin, so the inputs never have to fit in memory. The folder is built beside DIR and renamed
into place: a killed run leaves the previous DIR (or none), never half a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from perfmodel.argparse_util import parser
from perfmodel.specs import SpecError
from runtime.token_data import BIN, DTYPES, INDEX, TokenIndex, _progress, dtype_for, file_sha256, is_token_dir

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
PIECE_BYTES = 1 << 20  # text tokenized per call (cut at a line end)
BATCH_BYTES = 16 << 20  # text handed to one encode_batch (the library spreads it over threads)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _args(argv: list[str]):
    ap = parser("data", "token data for `moeperf run --data`")
    sub = ap.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("prepare", help="tokenize text files into a token folder (tokens.bin + index.json)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, a folder holding one, or a model name in the local Hugging Face cache")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files or folders (.jsonl: a document a line)")
    p.add_argument("--out", type=Path, required=True, help="token folder to write (replaced if it is one)")
    p.add_argument("--eos", default=None, help=f"end-of-document token (default: the first of {', '.join(EOS_CANDIDATES)})")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument("--json", action="store_true", help="print the index as JSON")
    return ap.parse_args(argv)


def resolve_tokenizer(spec: str) -> Path:
    """The tokenizer.json that --tokenizer names; never touches the network."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
        raise SpecError(f"--tokenizer: {p} has no tokenizer.json")
    if _REPO_ID.fullmatch(spec) and not spec.endswith(".json"):
        try:
            from huggingface_hub import try_to_load_from_cache
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:  # tokenizers depends on it; a stripped install may lack it
            found, cache = None, "~/.cache/huggingface/hub"
        else:
            found, cache = try_to_load_from_cache(spec, "tokenizer.json"), HF_HUB_CACHE
        if isinstance(found, str):
            return Path(found)
        raise SpecError(f"--tokenizer: {spec} is not a file and not in the local Hugging Face cache ({cache}); "
                        f"pass a tokenizer.json path, or fetch it once with network: "
                        f"`hf download {spec} tokenizer.json`")
    raise SpecError(f"--tokenizer: {spec}: no such file or folder")


def load_tokenizer(path: Path, eos: str | None) -> tuple[Tokenizer, int, str, int]:
    """(tokenizer, vocab_size, eos_token, eos_id); vocab_size covers every id it can emit."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises bare Exception for a malformed file
        raise SpecError(f"--tokenizer: {path} is not a Hugging Face tokenizer.json ({exc})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    names = [eos] if eos is not None else [c for c in EOS_CANDIDATES if c in vocab]
    if not names or tok.token_to_id(names[0]) is None:
        raise SpecError(f"--eos: {eos!r} is not a token of {path}; name its end-of-document token" if eos else
                        f"--eos: {path} has none of {', '.join(EOS_CANDIDATES)}; name its end-of-document "
                        "token with --eos TOKEN")
    return tok, vocab_size, names[0], int(tok.token_to_id(names[0]))


def input_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise SpecError(f"--input: {p}: no such file or folder")
        files += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    if not files:
        raise SpecError(f"--input: {' '.join(paths)} holds no files")
    return files


def _decode(blob: bytes, path: Path, offset: int) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"--input: {path} is not UTF-8 text (byte {offset + exc.start}); convert it "
                        "(e.g. iconv -t UTF-8) or leave it out") from None


def _cut(blob: bytes, whole_lines: bool) -> int:
    """Where a piece ends: after the last newline; with none, before an unfinished UTF-8 character
    (whole_lines: nowhere, 0: a .jsonl line is never split)."""
    nl = blob.rfind(b"\n")
    if nl >= 0 or whole_lines:
        return nl + 1
    i = len(blob)
    while i > 0 and len(blob) - i < 3 and (blob[i - 1] & 0xC0) == 0x80:  # continuation bytes
        i -= 1
    return i - 1 if i > 0 and blob[i - 1] >= 0xC0 else len(blob)


def pieces(path: Path, text_key: str, stats: dict) -> Iterator[tuple[str, bool, int]]:
    """(text, ends_a_document, input_bytes) pieces of one file; stats gets its bytes, SHA-256, documents."""
    h, offset, docs, jsonl = hashlib.sha256(), 0, 0, path.suffix == ".jsonl"
    carry = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            h.update(block)
            blob = carry + block
            if not blob:
                break
            end = _cut(blob, jsonl) if block else len(blob)
            piece, carry = blob[:end], blob[end:]
            text = _decode(piece, path, offset)
            offset += len(piece)
            if jsonl:
                lines = [ln for ln in text.splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    docs += 1
                    yield _jsonl_text(line, text_key, path, docs), True, len(piece) if k == 0 else 0
            elif text:
                yield text, False, len(piece)
    if not jsonl and offset:
        docs += 1
        yield "", True, 0  # the file's end: its one document's EOS
    stats.update(path=str(path), bytes=offset, sha256=h.hexdigest(), documents=docs)


def _jsonl_text(line: str, key: str, path: Path, doc: int) -> str:
    try:
        text = json.loads(line)[key]
        if isinstance(text, str):
            return text
    except (ValueError, KeyError, TypeError):
        pass
    raise SpecError(f"--input: {path}: document {doc} is not a JSON object with a string {key!r} field "
                    "(set --text-key, or give plain text a .txt name)")


def _encode(tok: Tokenizer, batch: list[tuple[str, bool, int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encs = encode([t for t, _, _ in batch], add_special_tokens=False)
    parts = []
    for enc, (_, ends, _) in zip(encs, batch, strict=True):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        if ends:
            parts.append(np.array([eos_id], dtype=np.int64))
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def tokenize(tok: Tokenizer, files: list[Path], eos_id: int, dtype_name: str, text_key: str, bin_path: Path
             ) -> tuple[int, str, list[dict]]:
    """Stream every file's tokens into bin_path; returns (tokens, bin SHA-256, per-file sources)."""
    dtype = DTYPES[dtype_name]
    h, n_tokens, sources = hashlib.sha256(), 0, []
    total = sum(f.stat().st_size for f in files)
    with open(bin_path, "wb") as out, _progress("tokenizing", total, min_bytes=16 << 20) as advance:
        def flush(batch: list) -> None:
            nonlocal n_tokens
            ids = _encode(tok, batch, eos_id, dtype)
            out.write(ids.tobytes())
            h.update(ids.tobytes())
            n_tokens += len(ids)
            advance(sum(b for _, _, b in batch))
            batch.clear()

        for path in files:
            stats: dict = {}
            batch: list = []
            chars = 0
            for piece in pieces(path, text_key, stats):
                batch.append(piece)
                chars += len(piece[0])
                if chars >= BATCH_BYTES:
                    flush(batch)
                    chars = 0
            if batch:
                flush(batch)
            sources.append(stats)
        out.flush()
        os.fsync(out.fileno())
    return n_tokens, h.hexdigest(), sources


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_token_dir(out):
        raise SpecError(f"--out: {out} is a folder of other files; name a new folder (a token folder is replaced)")


def prepare(tokenizer: str, inputs: list[str], out: Path, eos: str | None = None, text_key: str = "text"
            ) -> TokenIndex:
    _check_out(out)
    files = input_files(inputs)
    tok_path = resolve_tokenizer(tokenizer)
    tok, vocab_size, eos_token, eos_id = load_tokenizer(tok_path, eos)
    dtype_name = dtype_for(vocab_size)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.parent / f".{out.name}.tmp-{os.getpid()}", out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n_tokens, digest, sources = tokenize(tok, files, eos_id, dtype_name, text_key, tmp / BIN)
        docs = sum(s["documents"] for s in sources)
        if docs == 0:
            raise SpecError(f"--input: {' '.join(inputs)} holds no text")
        index = TokenIndex(dtype=dtype_name, vocab_size=vocab_size, tokens=n_tokens, documents=docs, eos_id=eos_id,
                           bin_bytes=n_tokens * DTYPES[dtype_name].itemsize, bin_sha256=digest,
                           tokenizer={"source": tokenizer, "sha256": file_sha256(tok_path), "eos_token": eos_token},
                           sources=sources)
        from perfmodel import atomic

        atomic.write_json(tmp / INDEX, index.to_json())
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def main(argv: list[str] | None = None) -> int:
    a = _args(list(sys.argv[1:] if argv is None else argv))
    index = prepare(a.tokenizer, a.input, a.out, a.eos, a.text_key)
    if a.json:
        print(json.dumps(index.to_json(), indent=1))
    else:
        print(f"moeperf data prepare: {index.tokens:,} tokens ({index.dtype}, vocab {index.vocab_size:,}, "
              f"eos {index.eos_id}) from {index.documents:,} documents in {len(index.sources)} files -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
