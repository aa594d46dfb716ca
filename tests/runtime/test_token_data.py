"""Token folders (`moeperf data prepare`, runtime/token_data.py) and `moeperf run --data DIR`: the format
round-trips, replicas read disjoint sequences, a resume continues on the next token, bad data exits 2."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import proc_group
import pytest

from perfmodel.cli import main as cli
from perfmodel.layout import group_of, rank_groups
from perfmodel.opnames import GROUP_KINDS
from perfmodel.specs import PlanSpec, SpecError

tokenizers = pytest.importorskip("tokenizers")

from runtime import data_prepare  # noqa: E402
from runtime.data import step_batch  # noqa: E402
from runtime.groups import Parallel  # noqa: E402
from runtime.token_data import BIN, INDEX, TokenBatches, permute  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the expert router sends each token to two of eight experts and the loss falls — ünïcode".split()


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(n)]


def _tokenizer(path: Path, vocab_size: int = 120) -> Path:
    """A character-level BPE (no pre-tokenizer, Fuse decoder): decode(encode(text)) == text."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([ln + "\n" for ln in _lines(50)], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tokenizer.json, a .txt and a .jsonl input) shared by the tests of this module."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(_lines(150, 1)) + "\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _lines(150, 2)))
    return _tokenizer(d / "tokenizer.json"), d / "a.txt", d / "b.jsonl"


@pytest.fixture(scope="module")
def tokens(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "toks"
    tok, a, b = corpus
    assert cli(["data", "prepare", "--tokenizer", str(tok), "--input", str(a), str(b), "--out", str(out)]) == 0
    return out


def test_prepare_round_trip(corpus, tokens, monkeypatch, tmp_path):
    from tokenizers import Tokenizer

    tok_path, a, b = corpus
    index = json.loads((tokens / INDEX).read_text())
    ids = np.fromfile(tokens / BIN, dtype=np.uint16)
    assert index["dtype"] == "uint16" and index["tokens"] == len(ids) and index["documents"] == 151
    assert [s["documents"] for s in index["sources"]] == [1, 150] and index["eos_id"] == 0
    tok = Tokenizer.from_file(str(tok_path))
    docs = np.split(ids, np.flatnonzero(ids == index["eos_id"]) + 1)
    assert len(docs[-1]) == 0 and all(d[-1] == index["eos_id"] for d in docs[:-1])
    texts = [tok.decode(d[:-1].tolist()) for d in docs[:-1]]
    assert texts == [a.read_text()] + [json.loads(ln)["text"] for ln in b.read_text().splitlines()]
    # pieces cut inside long non-ASCII lines (no newline in a piece) still decode to the text
    long = tmp_path / "long.txt"
    long.write_text(" ".join(_lines(40, 3)))
    monkeypatch.setattr(data_prepare, "PIECE_BYTES", 37)
    monkeypatch.setattr(data_prepare, "BATCH_BYTES", 100)
    data_prepare.prepare(str(tok_path), [str(long)], tmp_path / "t")
    assert tok.decode(np.fromfile(tmp_path / "t" / BIN, dtype=np.uint16)[:-1].tolist()) == long.read_text()


def test_wide_vocab_is_uint32_and_cached_names_resolve(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    snap = tmp_path / "hub" / "models--org--wide" / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    tok.save(str(snap / "tokenizer.json"))
    (tmp_path / "hub" / "models--org--wide" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--wide" / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "in.txt").write_text("w69999 w3 nope")
    index = data_prepare.prepare("org/wide", [str(tmp_path / "in.txt")], tmp_path / "out")
    assert index.dtype == "uint32" and index.vocab_size == 70_002
    assert np.fromfile(tmp_path / "out" / BIN, dtype=np.uint32).tolist() == [70_001, 5, 1, 0]


@pytest.mark.parametrize("args,needle", [
    (["--tokenizer", "no-org/no-such-tokenizer"], "not in the local Hugging Face cache"),
    (["--input", "MISSING"], "no such file"),
    (["--input", "BAD"], "not UTF-8"),
    (["--eos", "<nope>"], "--eos"),
])
def test_prepare_bad_input_exits_2(corpus, tmp_path, capsys, args, needle):
    tok, a, _ = corpus
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe")
    argv = {"--tokenizer": str(tok), "--input": str(a), "--out": str(tmp_path / "out")}
    for flag, val in zip(args[::2], args[1::2], strict=True):
        argv[flag] = {"MISSING": str(tmp_path / "missing.txt"), "BAD": str(tmp_path / "bad.txt")}.get(val, val)
    rc = cli(["data", "prepare", *[x for kv in argv.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(permute(np.arange(n), n, 5, 0).tolist()) == list(range(n))
    assert permute(np.arange(1000), 1000, 5, 0).tolist() != permute(np.arange(1000), 1000, 5, 1).tolist()


def _par(plan: PlanSpec, world: int, rank: int) -> Parallel:
    groups = rank_groups(plan, world)
    return Parallel(rank=rank, world=world, ranks={k: group_of(groups, k, rank) for k in GROUP_KINDS})


def test_replicas_read_disjoint_sequences(tokens):
    """sp2 x ep2 on 4 ranks: 2 replicas. Ranks of one replica read the same rows (their own sequence
    shards), the replicas disjoint ones, and one epoch reads every sequence once, then reshuffles."""
    plan, seq_len = PlanSpec(sp=2, ep=2, global_batch=4, micro_batch=1), 16
    data = TokenBatches(tokens, seq_len, plan.global_batch, seed=3)
    pars = [_par(plan, 4, r) for r in range(4)]
    assert [p.index("dp") for p in pars] == [0, 0, 1, 1]
    seen: list[list[int]] = [[], []]
    steps_per_epoch = data.samples // plan.global_batch
    for step in range(1, steps_per_epoch + 1):
        shards = [step_batch(data, step, p) for p in pars]
        for replica in (0, 1):  # the two sp ranks hold the two halves of the same sequences
            (i0, t0), (i1, t1) = shards[2 * replica], shards[2 * replica + 1]
            rows = data.rows(step, 2, replica)
            assert (np.concatenate([i0.numpy(), i1.numpy()], 1) == rows[:, :-1]).all()
            assert (np.concatenate([t0.numpy(), t1.numpy()], 1) == rows[:, 1:]).all()
        first = data.sample_of(step)
        for replica in (0, 1):
            seen[replica] += (data.starts(first + 2 * replica, 2) // seq_len).tolist()
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0] + seen[1]) == len(set(seen[0] + seen[1])) == steps_per_epoch * plan.global_batch
    epoch2 = data.starts(data.samples, data.samples) // seq_len
    assert sorted(epoch2.tolist()) == list(range(data.samples)) and epoch2.tolist() != sorted(seen[0] + seen[1])


def test_resume_reads_the_saved_position(tokens):
    data = TokenBatches(tokens, 16, 4, seed=0)
    assert data.position(3) == {"consumed_samples": 12, "consumed_tokens": 192, "epoch": 0, "sample_in_epoch": 12}
    other = TokenBatches(tokens, 16, 4, seed=0)
    other.resume(data.identity(), {"consumed_samples": 12 + 4}, 3, "ckpt")  # saved one step further on
    assert (other.rows(4, 1, 0) == data.rows(5, 1, 0)).all()
    with pytest.raises(SpecError, match="trained on synthetic data"):
        other.resume({"kind": "synthetic"}, None, 3, "ckpt")


def _run_args(tmp_path: Path, data: Path, out: str) -> list[str]:
    plan = tmp_path / "plan.yaml"
    plan.write_text("kind: plan\ndp: 2\nglobal_batch: 4\nmicro_batch: 2\n")
    return ["run", "--model", "tiny-moe", "--plan", str(plan), "--nproc", "2", "--seq-len", "16", "--scale", "0.25",
            "--data", str(data), "--out", str(tmp_path / out), "--ckpt-every", "2"]


def _metrics(out: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "consumed_samples")}
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_resumed_run_continues_on_the_next_token(tokens, corpus, tmp_path, capsys):
    """dp=2 on 2 ranks: resumed from its step-2 checkpoint, a run redoes steps 3-4 bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*extra: str):
        proc = proc_group.run([sys.executable, "-m", "perfmodel.cli", *_run_args(tmp_path, tokens, "a"), *extra],
                              cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("--steps", "4")
    full = _metrics(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "ckpt" / "step_000002" / "meta.json").read_text())
    assert meta["data_position"] == {"consumed_samples": 8, "consumed_tokens": 128, "epoch": 0, "sample_in_epoch": 8}
    shutil.rmtree(tmp_path / "a" / "ckpt" / "step_000004")
    assert "resumed from" in run("--steps", "4", "--resume").stdout
    assert _metrics(tmp_path / "a") == full and [r["consumed_samples"] for r in full] == [4, 8, 12, 16]
    # resuming on another token folder is refused before launch
    tok, a, _ = corpus
    assert cli(["data", "prepare", "--tokenizer", str(tok), "--input", str(a), "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    rc = cli(_run_args(tmp_path, tmp_path / "other", "a") + ["--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--resume" in err[0] and "same --data" in err[0], err


def _truncate(d: Path) -> None:
    (d / BIN).write_bytes((d / BIN).read_bytes()[:-3])


def _flip(d: Path) -> None:
    b = bytearray((d / BIN).read_bytes())
    b[100] ^= 0xFF
    (d / BIN).write_bytes(bytes(b))


def _bad_index(d: Path) -> None:
    (d / INDEX).write_text((d / INDEX).read_text()[:40])


def _no_bin(d: Path) -> None:
    (d / BIN).unlink()


@pytest.mark.parametrize("damage,needle", [(_truncate, "truncated"), (_flip, "SHA-256"),
                                           (_bad_index, "not a moeperf token index"), (_no_bin, "missing")])
def test_damaged_token_folder_exits_2_before_launch(tokens, tmp_path, capsys, damage, needle):
    d = tmp_path / "toks"
    shutil.copytree(tokens, d)
    damage(d)
    rc = cli(_run_args(tmp_path, d, "out") + ["--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0] and str(d) in err[0], err
    assert not (tmp_path / "out").exists()


def test_model_vocab_must_cover_the_tokenizer(tmp_path, capsys):
    tok = _tokenizer(tmp_path / "tokenizer.json", vocab_size=300)
    (tmp_path / "in.txt").write_text("\n".join(_lines(100)))
    assert cli(["data", "prepare", "--tokenizer", str(tok), "--input", str(tmp_path / "in.txt"),
                "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    rc = cli(_run_args(tmp_path, tmp_path / "t", "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vocab >= 300" in err[0], err
