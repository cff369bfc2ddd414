"""Coverage-guided fuzzing of every binary reader with atheris (libFuzzer for Python).

Each input is written as a file and opened with fidelity_kld.io.open_source; the property
is the one tests/test_fuzz_readers.py checks in seconds with hypothesis:

  * the reader refuses the bytes with a one-line DumpError naming the file, or opens a
    source whose every row reads and goes through the compiled core;
  * nothing else is raised (any other exception is reported as a crash), the process does
    not die (segfaults are reported by libFuzzer), no input takes longer than -timeout;
  * no input makes the process allocate much more than the file holds: numpy and Python
    allocations are traced (tracemalloc peak per input) and Arrow's pool peaks (the default
    pool's and the system pool's, which the Parquet logits reader uses) are watched;
    the claims a header makes (a length, a shape, a count) must be checked before use.

Readers: llama (.kld; its rows also go through the corrupt-row screen, io.llama.check_rows),
topk / topk-jsonl (a top-k dump, Parquet or vLLM-shaped JSONL, read and validated by
io.topk.read_topk, then bounded against itself by topk_compare.compare_topk), outcomes
(a benchmark outcome file of any format stats.outcomes reads; the first byte picks its name),
npy, npy-labels / npy-prompt-ids (a fuzzed x.labels.npy / x.prompt_ids.npy beside a valid
x.npy), npy-sidecar (a fuzzed x.npy.json beside a valid uint16 x.npy), ids-file (a fuzzed
--labels file, .npy or text, through io.ids.read_ids_file), safetensors, arrow (IPC file),
parquet, shards (a directory of shards: the input is split into files, each with a name
drawn from a list of shard, companion, temporary and hidden names and its own bytes; seeds
are valid .npy and llama.cpp shard directories; a directory that opens is also streamed,
stream.compare_sources in 3-row chunks cut at shard boundaries, and must give the per-read
results bitwise). Seeds are small valid files made here.

    pip install atheris
    python benchmarks/fuzz_atheris.py --all --runs 25000          # every reader, in turn
    python benchmarks/fuzz_atheris.py --reader npy -- -runs=50000 -timeout=10

--all runs each reader in its own process and prints a table: runs done, time, and whether
libFuzzer reported a crash, timeout or out-of-memory. --reader mixed fuzzes every reader in
one process (the first byte of an input picks the reader; one start-up, whose coverage
instrumentation takes minutes on a loaded machine, instead of one per reader):

    python benchmarks/fuzz_atheris.py --reader mixed -- -runs=110000 -timeout=10 -max_len=4096

Artifacts (crashing inputs) go to benchmarks/out/fuzz/.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

READERS = ("llama", "npy", "npy-labels", "npy-prompt-ids", "npy-sidecar", "ids-file",
           "safetensors", "arrow", "parquet", "shards", "topk", "topk-jsonl", "outcomes")
EXTENSION = {"llama": ".kld", "npy": ".npy", "npy-labels": ".npy", "npy-prompt-ids": ".npy",
             "npy-sidecar": ".npy", "ids-file": ".txt", "safetensors": ".safetensors",
             "arrow": ".arrow", "parquet": ".parquet", "shards": "", "topk": ".topk.parquet",
             "topk-jsonl": ".jsonl", "outcomes": ""}
# the names an outcomes case is written under (its first byte picks one): each harness's file
OUTCOME_NAMES = ("samples_arc_easy_2026-01-01T00-00-00.jsonl", "samples_gsm8k_2026-01-01T00-00-00.jsonl.gz",
                 "run_eval_all.json", "eval_results.json", "t.csv", "t.tsv", "t.jsonl", "t.csv.gz")
# companion readers: (fuzzed file's name, the valid dump opened beside it)
COMPANION = {"npy-labels": "d.labels.npy", "npy-prompt-ids": "d.prompt_ids.npy",
             "npy-sidecar": "d.npy.json"}
# names a shard-directory case gives its files: shards, a gap, numbered n-of-m names, a
# duplicate number, companions, temporary and hidden files, another format
SHARD_NAMES = ("part_0.npy", "part_1.npy", "part_2.npy", "part_10.npy", "part_1.npy.tmp",
               "shard-00001-of-00003.npy", "shard-00002-of-00003.npy", "shard-00003-of-00003.npy",
               "shard-01-of-03.npy", "part_0.labels.npy", "part_1.labels.npy", "part_1.prompt_ids.npy",
               "part_0.npy.json", ".part_3.npy.tmp", "part_0.kld", "part_1.kld", "notes.txt")
MAX_EXTRA_ALLOC = 16 << 20  # bytes a case may allocate beyond 4x its own size
ARROW_POOL_LIMIT = 256 << 20
OUT = Path(__file__).resolve().parent / "out" / "fuzz"


# ----------------------------------------------------------------------------- seeds


def llama_bytes(rng, n_ctx: int, n_vocab: int, n_chunk: int) -> bytes:
    """A llama.cpp file whose rows are real encodings of random logits (docs/formats.md),
    so that the corrupt-row screen passes the seeds."""
    import numpy as np

    r = n_ctx - 1 - n_ctx // 2
    words = 2 * ((n_vocab + 1) // 2) + 4
    logits = rng.normal(size=(r * n_chunk, n_vocab)) * 3
    top = logits.max(axis=1, keepdims=True)
    floor = np.maximum(logits.min(axis=1, keepdims=True), top - 16)
    lse = np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    scale = ((top - floor) / 65535).astype(np.float32)
    rows = np.zeros((r * n_chunk, words), "<u2")
    rows[:, :4] = np.concatenate([scale, (floor - top - lse).astype(np.float32)], axis=1).view("<u2")
    codes = np.rint(np.clip(logits - floor, 0, None) / scale)
    rows[:, 4 : 4 + n_vocab] = np.clip(codes, 0, 65535)
    tokens = rng.integers(0, n_vocab, size=n_ctx * n_chunk).astype("<i4")
    return (b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk) + tokens.tobytes()
            + rows.tobytes())


def pack_files(files: list[tuple[int, bytes]]) -> bytes:
    """A shard-directory case as bytes: per file a name index byte, a u16 length, the bytes."""
    return b"".join(bytes([i]) + len(b).to_bytes(2, "little") + b for i, b in files)


def unpack_files(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos + 3 <= len(data) and len(out) < 8:
        name = SHARD_NAMES[data[pos] % len(SHARD_NAMES)]
        n = int.from_bytes(data[pos + 1 : pos + 3], "little")
        out.append((name, data[pos + 3 : pos + 3 + n]))
        pos += 3 + n
    return out


def topk_seeds(reader: str, rng) -> list[bytes]:
    """Top-k dumps of random logits: Parquet as write_topk writes them (with and without
    labels), or vLLM-shaped JSONL records (capture.vllm's form: a None first position)."""
    import numpy as np

    from fidelity_kld.io.topk import from_logits, write_topk

    logits = rng.normal(size=(6, 9)) * 2
    labels = rng.integers(0, 9, 6)
    if reader == "topk":
        out = []
        with tempfile.TemporaryDirectory() as d:
            for t in (from_logits(logits, 3, labels, np.arange(6) // 3, vocab=9),
                      from_logits(logits, 4, None, np.zeros(6, np.int64))):
                out.append(Path(write_topk(t, Path(d) / "s.topk.parquet")).read_bytes())
        return out
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    records = []
    for pid, rows in ((0, range(0, 3)), (1, range(3, 6))):
        plps = [None] + [{str(int(j)): {"logprob": float(lp[r, j]), "rank": int(rank + 1)}
                          for rank, j in enumerate(np.argsort(-lp[r])[:3])} for r in rows]
        records.append({"prompt_id": pid, "prompt_token_ids": [int(t) for t in labels[: len(plps)]],
                        "prompt_logprobs": plps, "k": 3})
    return ["\n".join(json.dumps(r) for r in records).encode() + b"\n"]


def outcome_seeds() -> list[bytes]:
    """One valid file per outcome format (stats.outcomes), prefixed by its OUTCOME_NAMES
    index: lm-eval samples (plain and gzip), LiveCodeBench, EvalPlus, CSV, TSV, JSONL."""
    import gzip

    lm = b"".join(json.dumps({"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": i % 2}).encode()
                  + b"\n" for i in range(4))
    lm2 = b"".join(json.dumps({"doc_id": i, "filter": "strict-match", "exact_match": 1.0}).encode()
                   + b"\n" for i in range(3))
    lcb = json.dumps([{"question_id": "q1", "graded_list": [True, False], "pass@1": 0.5},
                      {"question_id": "q2", "graded_list": [True], "pass@1": 1.0}]).encode()
    plus = json.dumps({"eval": {"HumanEval/0": [{"base_status": "pass", "plus_status": "fail"}],
                                "HumanEval/1": [{"base_status": "pass", "plus_status": "pass"}]}}).encode()
    csv_ = b"model,task,prompt_id,score\nq4,arc,0,1\nq4,arc,1,0\nq8,arc,0,1\n"
    tsv = b"task\tprompt_id\tscore\narc\t0\t0.5\narc\t1\t1\n"
    jsonl = b'{"task": "arc", "prompt_id": 3, "score": 1}\n{"task": "arc", "prompt_id": "4", "score": 0}\n'
    files = (lm, gzip.compress(lm2, mtime=0), lcb, plus, csv_, tsv, jsonl, gzip.compress(csv_, mtime=0))
    return [bytes([i]) + blob for i, blob in enumerate(files)]


def seeds(reader: str) -> list[bytes]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.arange(6, dtype=np.int64) % 5
    if reader == "llama":
        return [llama_bytes(rng, *dims) for dims in ((8, 7, 2), (6, 4, 1))]
    if reader == "npy-sidecar":
        return [b'{"dtype": "bfloat16"}', b'{"dtype": "float16", "note": [1, {"a": null}]}']
    if reader == "ids-file":
        buf = io.BytesIO()
        np.save(buf, labels)
        return [b"\n".join(str(v).encode() for v in labels) + b"\n", buf.getvalue()]
    if reader == "shards":
        def npy(arr):
            buf = io.BytesIO()
            np.save(buf, arr)
            return buf.getvalue()
        names = {n: i for i, n in enumerate(SHARD_NAMES)}
        return [
            pack_files([(names["part_0.npy"], npy(x[:3])), (names["part_1.npy"], npy(x[3:])),
                        (names["part_0.labels.npy"], npy(labels[:3])),
                        (names["part_1.labels.npy"], npy(labels[3:]))]),
            pack_files([(names[f"shard-0000{i + 1}-of-00003.npy"], npy(x[2 * i : 2 * i + 2]))
                        for i in range(3)]),
            pack_files([(names["part_0.kld"], llama_bytes(rng, 6, 4, 1)),
                        (names["part_1.kld"], llama_bytes(rng, 6, 4, 2))]),
        ]
    if reader in ("npy", "npy-labels", "npy-prompt-ids"):
        arrays = ([labels, labels.astype(np.int32)] if reader != "npy"
                  else [x, x.astype(np.float16)])
        out = []
        for arr in arrays:
            buf = io.BytesIO()
            np.save(buf, arr)
            out.append(buf.getvalue())
        return out
    if reader in ("topk", "topk-jsonl"):
        return topk_seeds(reader, rng)
    if reader == "outcomes":
        return outcome_seeds()
    if reader == "safetensors":
        head = {"logits": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]},
                "labels": {"dtype": "I64", "shape": [6], "data_offsets": [120, 168]},
                "__metadata__": {"format": "fidelity_kld.logits"}}
        blob = json.dumps(head).encode()
        return [len(blob).to_bytes(8, "little") + blob + x.tobytes() + labels.tobytes()]
    values = pa.array(x.reshape(-1))
    tables = [
        pa.table({"logits": pa.FixedSizeListArray.from_arrays(values, 5), "label": labels}),
        pa.table({"logits": pa.ListArray.from_arrays(pa.array(np.arange(0, 31, 5, dtype=np.int32)),
                                                     values), "prompt_id": labels // 2}),
    ]
    out = []
    for t in tables:
        sink = pa.BufferOutputStream()
        if reader == "arrow":
            with pa.ipc.new_file(sink, t.schema) as w:
                for batch in t.to_batches(max_chunksize=4):
                    w.write_batch(batch)
        else:
            pq.write_table(t, sink, row_group_size=4)
        out.append(sink.getvalue().to_pybytes())
    return out


# ----------------------------------------------------------------------------- one case


class Harness:
    def __init__(self, reader: str, workdir: Path, target_runs: int):
        import numpy as np
        import pyarrow as pa

        import fidelity_kld as fk
        from fidelity_kld.io import DumpError, open_source

        self.np, self.pa, self.fk = np, pa, fk
        self.DumpError, self.open_source = DumpError, open_source
        self.reader = reader
        self.target = target_runs
        self.cases = 0
        self.outcomes = {"refused": 0, "read": 0}
        self.max_traced = 0
        from fidelity_kld.io.ids import read_ids_file
        from fidelity_kld.io.llama import check_rows

        self.read_ids_file, self.check_rows = read_ids_file, check_rows
        self.workdir = workdir
        if reader in COMPANION:
            self.path = workdir / COMPANION[reader]
            self.open_path = workdir / "d.npy"
            buf = io.BytesIO()
            np.save(buf, np.zeros((6, 5), np.uint16 if reader == "npy-sidecar" else np.float32))
            self.open_path.write_bytes(buf.getvalue())
        elif reader == "shards":
            self.path = self.open_path = workdir / "shards"
        else:
            self.path = self.open_path = workdir / f"case{EXTENSION[reader]}"
        tracemalloc.start()

    def refused(self, e: Exception) -> str:
        """'refused' for an error that names the file in one line; else an AssertionError."""
        if not self.named(str(e)):
            raise AssertionError(f"error does not name the file in one line: {e!r}") from None
        return "refused"

    def named(self, msg: str) -> bool:
        p = str(self.open_path)
        if self.reader == "shards":  # the directory or one of its files
            return "\n" not in msg and (msg.startswith(p + ": ") or msg.startswith(p + "/"))
        stem = p[:-4] if p.endswith(".npy") else p
        return "\n" not in msg and (msg.startswith(p + ": ") or msg.startswith(stem + "."))

    def write_case(self, data: bytes) -> None:
        if self.reader == "outcomes":  # the first byte names the file: its format
            for old in self.workdir.iterdir():
                old.unlink()
            self.path = self.open_path = self.workdir / OUTCOME_NAMES[(data or b"\0")[0] % len(OUTCOME_NAMES)]
            self.path.write_bytes(data[1:])
            return
        if self.reader != "shards":
            self.path.write_bytes(data)
            return
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        for name, blob in unpack_files(data):
            (self.path / name).write_bytes(blob)

    def __call__(self, data: bytes) -> None:
        self.write_case(data)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        outcome = self.open_and_read()
        peak = tracemalloc.get_traced_memory()[1] - base
        self.max_traced = max(self.max_traced, peak)
        if peak > 4 * len(data) + MAX_EXTRA_ALLOC:
            raise AssertionError(f"{peak} bytes allocated for a {len(data)}-byte input")
        if self.arrow_peak() > ARROW_POOL_LIMIT:
            raise AssertionError(f"Arrow pool peak {self.arrow_peak()}")
        self.outcomes[outcome] += 1
        self.cases += 1
        if self.cases % 5000 == 0 or self.cases == self.target:
            print(f"[{self.reader}] {self.cases} cases: {self.outcomes}, max traced "
                  f"allocation {self.max_traced} bytes, Arrow pool peak "
                  f"{self.arrow_peak()} bytes", file=sys.stderr, flush=True)

    def arrow_peak(self) -> int:
        """Both pools' peaks: the Parquet logits reader allocates from the system pool."""
        return max(self.pa.default_memory_pool().max_memory(), self.pa.system_memory_pool().max_memory())

    def open_and_read(self) -> str:
        if self.reader in ("topk", "topk-jsonl"):
            return self.read_topk()
        if self.reader == "outcomes":
            return self.read_outcomes()
        if self.reader == "ids-file":
            try:
                ids = self.read_ids_file(str(self.open_path), "labels")
            except self.DumpError as e:
                return self.refused(e)
            assert ids.ndim == 1 and ids.dtype == self.np.int64
            return "read"
        try:
            src = self.open_source(self.open_path)
        except self.DumpError as e:
            return self.refused(e)
        with src:
            assert src.n_tokens > 0 and src.vocab > 0
            if src.labels is not None:
                assert src.labels.shape == (src.n_tokens,)
                assert 0 <= src.labels.min() and src.labels.max() < src.vocab
            step = max(1, src.n_tokens // 3)
            parts = []
            for start in range(0, src.n_tokens, step):
                stop = min(start + step, src.n_tokens)
                try:
                    lg = src.read(start, stop)
                except self.DumpError as e:
                    return self.refused(e)
                assert lg.data.shape[0] == stop - start
                y = None if src.labels is None else src.labels[start:stop]
                st = self.fk.compare(lg, lg, y, llama_parity=src.dtype == "llama_u16",
                                     bad_rows="keep")  # screened below, as the CLI does
                assert st.n_tokens == stop - start
                parts.append(st)
            if self.reader == "shards":  # the stream: chunks end at shard boundaries
                self.check_stream(src, self.fk.TokenStats.concat(parts))
            if src.dtype == "llama_u16":  # the CLI's corrupt-row screen, both modes
                results = [self.fk.TokenStats.concat(parts)]
                [screened] = self.check_rows(src, [src], results, "invalid")
                assert screened.n_tokens == src.n_tokens
                try:
                    self.check_rows(src, [src], results, "refuse")
                except self.DumpError as e:
                    return self.refused(e)
        return "read"

    def read_topk(self) -> str:
        """read_topk (validated) refuses the file by name, or gives rows whose bounds
        against themselves compute (topk_compare.compare_topk) with one value per row."""
        from fidelity_kld.io.topk import read_topk
        from fidelity_kld.topk_compare import compare_topk

        try:
            t = read_topk(str(self.open_path))
        except self.DumpError as e:
            return self.refused(e)
        assert t.n_rows > 0 and t.token_ids.shape == t.logprobs.shape
        st = compare_topk(t, t, vocab=t.vocab)
        assert st.n_tokens == t.n_rows
        return "read"

    def read_outcomes(self) -> str:
        """stats.outcomes.read_outcomes (the format from the file's name) refuses the file
        with an OutcomeError naming it in one line, or gives scores in [0, 1] per prompt."""
        from fidelity_kld.stats.outcomes import OutcomeError, read_outcomes

        try:
            out = read_outcomes(self.open_path)
        except OutcomeError as e:
            return self.refused(e)
        for scores in out.tasks.values():
            assert all(0 <= v <= 1 for v in scores.values()), scores
        return "read"

    def check_stream(self, src, whole) -> None:
        """compare_sources on the source against a second opening of it, in chunks of three
        rows cut at shard boundaries: bitwise the per-read results."""
        from fidelity_kld.stream import chunk_bounds, compare_sources

        with self.open_source(self.open_path) as other:
            bounds = chunk_bounds((src, other), 3)
            assert bounds[0][0] == 0 and bounds[-1][1] == src.n_tokens
            assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
            [streamed] = compare_sources(src, [other], chunk_bytes=3 * 2 * src.bytes_per_token)
        for name in ("kld", "lse_ref", "top1_q"):
            a, b = getattr(streamed, name), getattr(whole, name)
            assert a.shape == b.shape and self.np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


# ----------------------------------------------------------------------------- drivers


class Mixed:
    """Every reader's harness in one process: data[0] picks the reader, data[1:] is its case."""

    def __init__(self, workdir: Path, target_runs: int):
        self.harnesses = []
        for r in READERS:
            (workdir / r).mkdir()
            self.harnesses.append(Harness(r, workdir / r, -1))
        self.target, self.cases = target_runs, 0

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        self.harnesses[data[0] % len(self.harnesses)](data[1:])
        self.cases += 1
        if self.cases % 10000 == 0 or self.cases == self.target:
            print(f"[mixed] {self.cases} cases: " + ", ".join(
                f"{h.reader} {h.outcomes['refused']}/{h.outcomes['read']}" for h in self.harnesses)
                + " (refused/read)", file=sys.stderr, flush=True)

    def open_and_read(self) -> None:
        for h, r in zip(self.harnesses, READERS):
            h.write_case(seeds(r)[0])
            h.open_and_read()


def run_one(reader: str, libfuzzer_args: list[str]) -> None:
    import atheris

    runs = next((int(a.split("=", 1)[1]) for a in libfuzzer_args if a.startswith("-runs=")), -1)
    corpus = Path(tempfile.mkdtemp(prefix=f"fk_corpus_{reader}_"))
    if reader == "mixed":
        initial = [bytes([i]) + seed for i, r in enumerate(READERS) for seed in seeds(r)]
    else:
        initial = seeds(reader)
    for i, seed in enumerate(initial):
        (corpus / f"seed{i}").write_bytes(seed)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="fk_fuzz_", dir=shm))
    OUT.mkdir(parents=True, exist_ok=True)
    harness = Mixed(workdir, runs) if reader == "mixed" else Harness(reader, workdir, runs)
    harness.open_and_read()  # import every module a case can reach before instrumenting
    # Coverage feedback for every loaded Python function (ours, numpy's .npy header parser,
    # pyarrow's wrappers). instrument_imports() misses the package: the editable install's
    # redirecting import finder bypasses its hook.
    atheris.instrument_all()
    argv = [sys.argv[0], str(corpus), f"-artifact_prefix={OUT}/{reader}-", *libfuzzer_args]
    atheris.Setup(argv, harness)
    atheris.Fuzz()


def run_all(runs: int, extra: list[str]) -> int:
    rows, failed = [], False
    for reader in READERS:
        t0 = time.monotonic()
        cmd = [sys.executable, __file__, "--reader", reader, "--", f"-runs={runs}",
               "-timeout=10", "-rss_limit_mb=2048", "-max_len=4096", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        log = r.stdout + r.stderr
        done = re.findall(r"Done (\d+) runs", log)
        problem = re.search(r"ERROR: libFuzzer: [^\n]*|Uncaught Python exception[^\n]*"
                            r"|==\d+== ERROR[^\n]*", log)
        stats = re.findall(rf"\[{re.escape(reader)}\] \d+ cases: [^\n]*", log)
        ok = r.returncode == 0 and done and not problem
        failed |= not ok
        rows.append((reader, int(done[-1]) if done else 0, seconds,
                     "ok" if ok else (problem.group(0) if problem else f"exit {r.returncode}"),
                     stats[-1] if stats else ""))
        if not ok:
            (OUT / f"{reader}.log").write_text(log)
    total = sum(r[1] for r in rows)
    print(f"{'reader':<12} {'runs':>8} {'seconds':>8}  result")
    for reader, done, seconds, result, stats in rows:
        print(f"{reader:<12} {done:>8} {seconds:>8.0f}  {result}")
        if stats:
            print(f"{'':<12} {stats}")
    print(f"{'total':<12} {total:>8}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reader", choices=(*READERS, "mixed"))
    p.add_argument("--all", action="store_true", help="every reader in turn, with a summary")
    p.add_argument("--runs", type=int, default=20000, help="cases per reader with --all")
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.all:
        return run_all(args.runs, rest)
    if not args.reader:
        p.error("give --reader or --all")
    run_one(args.reader, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
