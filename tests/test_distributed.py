"""fidelity_kld.distributed: compare on a local Ray cluster (started here, loopback only).

Every distributed result is checked bit for bit against the single-machine path
(stream.compare_sources, itself checked against reference.py in test_logit_stats.py; for
top-k dumps topk_compare.compare_topk, checked in test_topk_bounds.py; for hidden states
hidden.compare_hidden, checked in test_hidden.py): per-token arrays, summaries, per-prompt
tables, the CLI's JSON and Parquet outputs. Workers that die mid-task are retried; a range
that fails for good fails the run, naming itself. GPU workers are checked for their wiring
only (a fake Ray records the task options): no GPU here."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fidelity_kld import distributed
from fidelity_kld.cli import main
from fidelity_kld.io import open_source
from fidelity_kld.stats.per_prompt import per_prompt
from fidelity_kld.stats.summary import json_ready, summarize
from fidelity_kld.stream import compare_sources

DATA = Path(__file__).parent / "data"
# A token with KLD = +inf: numpy's std and percentile compute inf - inf on the way.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # this host only
    yield ray
    ray.shutdown()


def write_npy(path: Path, logits, labels=None, prompt_ids=None) -> None:
    np.save(path, logits)
    stem = str(path)[:-4]
    if labels is not None:
        np.save(stem + ".labels.npy", labels)
    if prompt_ids is not None:
        np.save(stem + ".prompt_ids.npy", prompt_ids)


@pytest.fixture(scope="module")
def npy_dumps(tmp_path_factory):
    """A reference in 2 shards with labels and 40 prompts of uneven length, one model in
    3 shards cut elsewhere (mid-prompt), one model in a single file; masked (-inf) entries
    and a NaN row, so that +inf KLD and invalid tokens go through the cluster too."""
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(15)
    lengths = rng.integers(5, 55, 40)
    n, v = int(lengths.sum()), 1271
    prompt_ids = np.repeat(np.arange(40), lengths)
    ends = np.cumsum(lengths)
    ref = (3 * rng.standard_normal((n, v))).astype(np.float16)
    q1 = (ref + 0.2 * rng.standard_normal((n, v))).astype(np.float16)
    q2 = (ref + 0.5 * rng.standard_normal((n, v))).astype(np.float16)
    q1[7, :10] = -np.inf  # P gives these mass, Q none: KLD = +inf
    q2[300, 3] = np.nan  # an invalid token
    labels = rng.integers(0, v, n)
    for d in ("ref", "q1"):
        (root / d).mkdir()
    cut = int(ends[19])  # a shard boundary at a prompt start
    write_npy(root / "ref" / "part_0.npy", ref[:cut], labels[:cut], prompt_ids[:cut])
    write_npy(root / "ref" / "part_1.npy", ref[cut:], labels[cut:], prompt_ids[cut:])
    q1_cuts = [0, int(ends[9]) + 2, int(ends[29]) + 3, n]  # inside prompts (all are >= 5 long)
    for k, (a, b) in enumerate(zip(q1_cuts[:-1], q1_cuts[1:])):
        np.save(root / "q1" / f"part_{k}.npy", q1[a:b])
    np.save(root / "q2.npy", q2)
    return root, prompt_ids, q1_cuts


def assert_bitwise(single, dist) -> None:
    assert len(single) == len(dist)
    for s, d in zip(single, dist):
        for f in dataclasses.fields(s):
            a, b = getattr(s, f.name), getattr(d, f.name)
            assert (a is None) == (b is None), f.name
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, f.name
                assert a.tobytes() == b.tobytes(), f.name


def single_machine(ref, quants):
    srcs = [open_source(p) for p in (ref, *quants)]
    try:
        return compare_sources(srcs[0], srcs[1:])
    finally:
        for s in srcs:
            s.close()


# --- planning (no Ray needed) -------------------------------------------------------------

def test_ranges_cover_the_tokens_and_cut_only_at_prompt_starts(npy_dumps):
    root, prompt_ids, q1_cuts = npy_dumps
    starts = set(np.concatenate([[0], np.flatnonzero(np.diff(prompt_ids)) + 1]).tolist())
    with open_source(root / "ref") as ref, open_source(root / "q1") as q1, \
            open_source(root / "q2.npy") as q2:
        ranges = distributed.plan(ref, [q1, q2], tasks=7, prompt_ids=prompt_ids)
    bounds = [r.start for r in ranges] + [ranges[-1].stop]
    assert bounds[0] == 0 and bounds[-1] == prompt_ids.size and bounds == sorted(set(bounds))
    assert set(bounds[:-1]) <= starts
    ref_cut = np.load(root / "ref" / "part_0.npy", mmap_mode="r").shape[0]
    assert ref_cut in bounds  # the reference's shard boundary is a prompt start: a cut
    assert not set(q1_cuts[1:-1]) & set(bounds)  # q1's boundaries fall inside prompts
    assert any(len(r.quants[0]) == 2 for r in ranges)  # so some range reads two q1 shards
    assert 6 <= len(ranges) <= 8
    for r in ranges:  # the pieces hold exactly the range's rows, in order
        for pieces in (r.ref, *r.quants):
            assert sum(p.stop - p.start for p in pieces) == r.stop - r.start
        assert len(r.ref) == 1  # never spans the reference's shards
        assert all(os.path.isabs(p.path) for p in r.ref)


def test_cut_points_without_prompt_ids_are_even():
    assert distributed.cut_points(10, 3, None) == [0, 3, 7, 10]
    assert distributed.cut_points(10, 1, None) == [0, 10]
    # a single prompt cannot be split, whatever the task count
    assert distributed.cut_points(10, 4, np.array([0])) == [0, 10]


def test_in_memory_sources_are_refused():
    from fidelity_kld.io import ArraySource

    src = ArraySource(np.zeros((4, 3), np.float32))
    with pytest.raises(distributed.DistributedError, match="in-memory"):
        distributed.compare_sources(src, [src])


def test_a_task_reads_its_rows_of_a_top_k_dump(tmp_path):
    """read_topk_rows (what a top-k task reads): the row groups holding a range, cut to
    it, equal to the whole file's rows, for ranges inside one group and across several."""
    from fidelity_kld.io.topk import TopKWriter, from_logits, read_topk, read_topk_rows

    rng = np.random.default_rng(4)
    path = tmp_path / "t.topk.parquet"
    writer = TopKWriter(str(path))
    for a, b in ((0, 10), (10, 17), (17, 40)):  # three row groups
        writer.write(from_logits(rng.standard_normal((b - a, 50)), 5, rng.integers(0, 50, b - a),
                                 positions=np.arange(a, b)))
    writer.close()
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    whole = read_topk(path)
    for a, b in ((0, 40), (3, 8), (9, 11), (12, 17), (5, 33), (39, 40)):
        part = read_topk_rows(path, a, b)
        for f in dataclasses.fields(whole):
            x, y = getattr(whole.rows(a, b), f.name), getattr(part, f.name)
            assert x == y if not isinstance(x, np.ndarray) else x.tobytes() == y.tobytes(), f.name
    from fidelity_kld.io import DumpError
    with pytest.raises(DumpError, match="40 rows, not the 41"):
        read_topk_rows(path, 30, 41)


# --- on the cluster -----------------------------------------------------------------------

def test_bitwise_the_single_machine_result_npy(ray_cluster, npy_dumps):
    root, prompt_ids, q1_cuts = npy_dumps
    ref, quants = root / "ref", [root / "q1", root / "q2.npy"]
    single = single_machine(ref, quants)
    dist = distributed.compare(ref, quants, tasks=5)
    assert_bitwise(single, dist)
    assert np.isinf(dist[0].kld[7]) and np.isnan(dist[1].kld[300])
    for s, d in zip(single, dist):
        assert summarize(s).to_dict() == summarize(d).to_dict()
        ps, pd_ = per_prompt(s, prompt_ids), per_prompt(d, prompt_ids)
        assert ps.keys() == pd_.keys()
        assert all(ps[k].tobytes() == pd_[k].tobytes() for k in ps)


def test_bitwise_llama_files_and_file_uri(ray_cluster, llama_base_path, llama_q4_path):
    """llama.cpp files: llama parity (windowed KLD) and prompt ids from the chunk numbers."""
    single = single_machine(llama_base_path, [llama_q4_path])
    dist = distributed.compare(llama_base_path.as_uri(), [llama_q4_path.as_uri()], tasks=4)
    assert dist[0].kld_llama is not None
    assert_bitwise(single, dist)
    assert summarize(single[0]).to_dict() == summarize(dist[0]).to_dict()


def test_other_filesystems_are_refused():
    with pytest.raises(distributed.DistributedError, match="mount"):
        distributed.compare("mock:///ref.npy", ["mock:///q.npy"])


def test_cuda_needs_a_gpu_in_the_cluster(ray_cluster, llama_base_path, llama_q4_path):
    with pytest.raises(distributed.DistributedError, match="no GPU"):
        distributed.compare(llama_base_path, [llama_q4_path], device="cuda")


def test_a_worker_killed_mid_task_is_retried(ray_cluster, npy_dumps, tmp_path):
    """The first worker to compare a chunk dies (os._exit, as a killed process does) before
    it returns; Ray runs the task again and the result is still bitwise."""
    root, *_ = npy_dumps
    marker = str(tmp_path / "killed")

    def die_once_then_compare(*args, **kwargs):  # a closure: pickled by value for the workers
        import os as os_

        from fidelity_kld.ops import compare_many
        try:
            os_.close(os_.open(marker, os_.O_CREAT | os_.O_EXCL | os_.O_WRONLY))
        except FileExistsError:
            return compare_many(*args, **kwargs)
        os_._exit(1)

    ref, quants = root / "ref", [root / "q1", root / "q2.npy"]
    dist = distributed.compare(ref, quants, tasks=4, compare_many_fn=die_once_then_compare)
    assert os.path.exists(marker)  # a worker did die
    assert_bitwise(single_machine(ref, quants), dist)


def test_a_range_whose_worker_always_dies_fails_the_run(ray_cluster, npy_dumps, monkeypatch):
    root, *_ = npy_dumps
    real = distributed.compare_range

    def dies_on_range_1(rng, *args, **kwargs):
        import os as os_
        if rng.index == 1:
            os_._exit(1)
        return real(rng, *args, **kwargs)

    monkeypatch.setattr(distributed, "compare_range", dies_on_range_1)
    with open_source(root / "ref") as ref, open_source(root / "q2.npy") as q2:
        bad = distributed.plan(ref, [q2], tasks=3, prompt_ids=ref.prompt_ids)[1]
        with pytest.raises(distributed.RangeFailed) as e:
            distributed.compare_sources(ref, [q2], tasks=3, max_retries=1)
    msg = str(e.value)
    assert f"tokens [{bad.start}, {bad.stop})" in msg and "2 attempts" in msg
    assert str(root / "ref" / "part_0.npy") in msg and str(root / "q2.npy") in msg
    assert "\n" not in msg


def test_a_file_a_worker_cannot_read_fails_the_run(ray_cluster, npy_dumps, tmp_path):
    """The driver opened the file, then it changed under it: the worker that reads it says
    which file and which range, and the error is not retried."""
    root, *_ = npy_dumps
    q2 = np.load(root / "q2.npy")
    np.save(tmp_path / "q2.npy", q2)
    with open_source(root / "ref") as ref, open_source(tmp_path / "q2.npy") as q:
        np.save(tmp_path / "q2.npy", q2[:100])  # now shorter on "shared storage"
        with pytest.raises(distributed.RangeFailed,
                           match=rf"tokens \[\d+, \d+\) .*{tmp_path / 'q2.npy'}.*: .*100 tokens"):
            distributed.compare_sources(ref, [q], tasks=2)


# --- the CLI ------------------------------------------------------------------------------

def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_cli_outputs_are_bitwise_and_cohort_reads_them(ray_cluster, tmp_path, capsys):
    """compare --ray writes the same JSON and Parquet bytes' worth of numbers as compare;
    cohort reads the distributed run's JSON and gives the same analysis."""
    rng = np.random.default_rng(3)
    n, v = 240, 257
    ref = rng.standard_normal((n, v)).astype(np.float32)
    labels = rng.integers(0, v, n)
    write_npy(tmp_path / "bf16.npy", ref, labels, np.repeat(np.arange(12), 20))
    names = ["q8", "q6", "q4", "q3", "q2"]
    for k, name in enumerate(names):
        np.save(tmp_path / f"{name}.npy", ref + (0.05 * 2 ** k) * rng.standard_normal((n, v)).astype(np.float32))
    quants = [str(tmp_path / f"{m}.npy") for m in names]
    outs = {}
    for mode, extra in (("single", []), ("ray", ["--ray", "auto", "--ray-tasks", "3"])):
        d = tmp_path / mode
        d.mkdir()
        code, out, err = run_cli(["compare", str(tmp_path / "bf16.npy"), *quants, "-q",
                                  "-o", str(d / "summary.json"), "--per-prompt", str(d / "pp.parquet"),
                                  "--per-token", str(d / "pt.parquet"), *extra], capsys)
        assert code == 0, err
        outs[mode] = out
    assert outs["ray"] == outs["single"]
    assert (tmp_path / "ray" / "summary.json").read_text() == (tmp_path / "single" / "summary.json").read_text()
    for f in ("pp.parquet", "pt.parquet"):
        assert pq.read_table(tmp_path / "ray" / f).equals(pq.read_table(tmp_path / "single" / f))

    cohort = DATA / "cohort"
    reports = {}
    for mode in ("single", "ray"):
        models = "\n".join(textwrap.dedent(f"""
            [[models]]
            name = "{m}"
            outcomes = ["{cohort}/lm_eval/{m}", "{cohort}/livecodebench/{m}_codegeneration_eval_all.json"]
            """) for m in names)
        manifest = tmp_path / mode / "manifest.toml"
        manifest.write_text(textwrap.dedent(f"""
            name = "distributed"
            fidelity = "summary.json"
            filters = {{ gsm8k = "strict-match" }}
            [reference]
            name = "bf16"
            outcomes = ["{cohort}/lm_eval/bf16", "{cohort}/livecodebench/bf16_codegeneration_eval_all.json"]
            """) + models)
        code, out, err = run_cli(["cohort", str(manifest), "--format", "json", "--bootstrap", "50",
                                  "--holdout-reps", "5"], capsys)
        assert code == 0, err
        reports[mode] = json.loads(out)
    kld = next(x for x in reports["ray"]["variants"] if x["name"] == "kld_mean")
    assert kld["full"]["n"] == 5
    reports["ray"].pop("manifest", None), reports["single"].pop("manifest", None)
    assert reports["ray"] == reports["single"]


def test_cli_failing_range_writes_nothing(ray_cluster, npy_dumps, tmp_path, monkeypatch, capsys):
    root, *_ = npy_dumps
    real = distributed.compare_range

    def unreadable_range_2(rng, *args, **kwargs):
        from fidelity_kld.io import DumpError
        if rng.index == 2:
            raise DumpError(f"{rng.quants[0][0].path}: cannot read (Input/output error)")
        return real(rng, *args, **kwargs)

    monkeypatch.setattr(distributed, "compare_range", unreadable_range_2)
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(["compare", str(root / "ref"), str(root / "q2.npy"), "--ray", "auto",
                              "--ray-tasks", "4", "-q", "-o", str(out_json),
                              "--per-token", str(tmp_path / "pt.parquet")], capsys)
    assert code == 1 and out == ""
    line = err.strip()
    assert "\n" not in line and "tokens [" in line and "q2.npy: cannot read (Input/output error)" in line
    assert list(tmp_path.iterdir()) == []


def test_cli_ray_tasks_needs_ray(capsys):
    code, _, err = run_cli(["compare", "--example", "--ray-tasks", "2"], capsys)
    assert code == 2 and "--ray-tasks needs --ray" in err


# --- top-k dumps, hidden-state dumps, converted llama.cpp files ----------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory, llama_base_path, llama_q4_path):
    """The llama.cpp fixtures converted with `fidelity-kld convert`: top-k (k = 8) Parquet,
    and float32 log-probs (which carry the metadata that they are llama.cpp's)."""
    d = tmp_path_factory.mktemp("converted")
    for name, src in (("base", llama_base_path), ("q4", llama_q4_path)):
        assert main(["convert", str(src), str(d / f"{name}.topk.parquet"), "--top-k", "8", "-q"]) in (None, 0)
        assert main(["convert", str(src), str(d / f"{name}.npy"), "-q"]) in (None, 0)
    assert main(["convert", str(llama_base_path), str(d / "base.safetensors"), "-q"]) in (None, 0)
    return d


def single_topk(ref, quants):
    from fidelity_kld.topk_compare import check_pair, compare_topk, open_side

    sides = [open_side(p) for p in (ref, *quants)]
    try:
        vocabs = [check_pair(sides[0], q, str(ref), str(p)) for q, p in zip(sides[1:], quants)]
        return [compare_topk(sides[0], q, vocab=v) for q, v in zip(sides[1:], vocabs)], sides, vocabs
    finally:
        for s in sides:
            if hasattr(s, "close"):
                s.close()


@pytest.mark.parametrize("ref,quants,tasks,ranges", [
    # both top-k: cut at prompt starts (the 6 chunks), anywhere
    ("base.topk.parquet", ["q4.topk.parquet"], 5, 5),
    # a full side: cut on compare_topk's block grid (524 rows of V = 8000), so 2 ranges
    ("base.topk.parquet", ["q4.npy", "q4.topk.parquet"], 4, 2),
    ("base.npy", ["q4.topk.parquet"], 4, 2),
])
def test_topk_bounds_bitwise_the_single_machine_result(ray_cluster, converted, ref, quants,
                                                       tasks, ranges):
    from fidelity_kld.stats.topk_bounds import summarize_topk
    from fidelity_kld.topk_compare import open_side

    paths = [converted / p for p in (ref, *quants)]
    single, _, vocabs = single_topk(paths[0], paths[1:])
    sides = [open_side(p) for p in paths]
    seen = []
    try:
        dist = distributed.compare_topk_sides(sides, [str(p) for p in paths], vocabs, tasks=tasks,
                                              progress=seen.append)
    finally:
        for s in sides:
            if hasattr(s, "close"):
                s.close()
    assert seen[-1].tasks_total == ranges and seen[-1].tokens_done == seen[-1].tokens_total == 762
    assert_bitwise(single, dist)
    assert dist[0].nll_ref is not None and np.isfinite(dist[0].kld_upper).all()
    for s, d in zip(single, dist):
        assert json.dumps(json_ready(summarize_topk(s))) == json.dumps(json_ready(summarize_topk(d)))


@pytest.fixture(scope="module")
def hidden_dumps(tmp_path_factory):
    """A reference and two quants' hidden states (H = 48) with their lm_heads (V = 1271),
    labels and 6 prompts; q2's head is the reference's rounded coarser than q1's."""
    from fidelity_kld.io.hidden import write_hidden

    d = tmp_path_factory.mktemp("hidden")
    rng = np.random.default_rng(15)
    n, h, v = 300, 48, 1271
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h) * 4).astype(np.float32)
    kw = dict(labels=rng.integers(0, v, n), prompt_ids=np.repeat(np.arange(6), n // 6))
    paths = [write_hidden(d / "ref.hidden.safetensors", hid, lm_head=w, **kw)]
    for name, noise, step in (("q1", 0.05, 8), ("q2", 0.2, 2)):
        hq = (hid + noise * rng.standard_normal((n, h))).astype(np.float16)
        paths.append(write_hidden(d / f"{name}.hidden.safetensors", hq,
                                  lm_head=(np.round(w * step) / step).astype(np.float32), **kw))
    return [Path(p) for p in paths], kw["prompt_ids"]


@pytest.mark.parametrize("shared_lm_head", [False, True])
def test_hidden_states_bitwise_the_single_machine_result(ray_cluster, hidden_dumps, shared_lm_head):
    from fidelity_kld.hidden import compare_hidden, heads_for
    from fidelity_kld.io.hidden import HiddenDump

    paths, prompt_ids = hidden_dumps
    dumps = [HiddenDump(p) for p in paths]
    heads = heads_for(dumps[0], dumps[1:], shared_lm_head=shared_lm_head)
    tile = 7 * 3 * 1271 * 4  # tiles of 7 rows: ranges on that grid, the last tile partial
    single = compare_hidden(dumps[0], dumps[1:], heads, tile_bytes=tile)
    seen = []
    dist = distributed.compare_hidden_dumps(dumps[0], dumps[1:], heads, shared_lm_head=shared_lm_head,
                                            tile_bytes=tile, tasks=4, progress=seen.append)
    assert seen[-1].tasks_total == 4 and seen[-1].tokens_done == 300
    assert_bitwise(single, dist)
    for s, d in zip(single, dist):
        assert summarize(s).to_dict() == summarize(d).to_dict()
        ps, pd_ = per_prompt(s, prompt_ids), per_prompt(d, prompt_ids)
        assert all(ps[k].tobytes() == pd_[k].tobytes() for k in ps)


def test_converted_llama_files_bitwise_the_original(ray_cluster, converted, llama_base_path,
                                                   llama_q4_path):
    """float32 conversions carry 'llama.cpp log-probs' metadata: the workers read them back
    as the llama.cpp rows, so the distributed run equals one machine on the .kld files."""
    from fidelity_kld.io.conversion import llama_rows

    single = single_machine(llama_base_path, [llama_q4_path])
    with llama_rows(open_source(converted / "base.safetensors")) as ref, \
            llama_rows(open_source(converted / "q4.npy")) as q:
        assert ref.dtype == q.dtype == "llama_u16"
        dist = distributed.compare_sources(ref, [q], tasks=3)
    assert dist[0].kld_llama is not None
    assert_bitwise(single, dist)


def cli_pair(capsys, tmp_path, ref, quants, per_prompt=False):
    """(single-machine dir, distributed dir, the distributed run's stderr) after running
    compare both ways (--ray auto --ray-tasks 4) with --output, --per-token (and
    --per-prompt); the printed JSON in stdout.json."""
    err_ray = None
    for mode, more in (("single", ["-q"]), ("ray", ["--ray", "auto", "--ray-tasks", "4"])):
        d = tmp_path / mode
        d.mkdir()
        pp = ["--per-prompt", str(d / "pp.parquet")] if per_prompt else []
        code, out, err = run_cli(["compare", str(ref), *map(str, quants), "--format", "json",
                                  "-o", str(d / "s.json"), "--per-token", str(d / "pt.parquet"),
                                  *pp, *more], capsys)
        assert code == 0, err
        (d / "stdout.json").write_text(out)
        err_ray = err
    return tmp_path / "single", tmp_path / "ray", err_ray


def assert_same_outputs(single: Path, ray: Path, files=("s.json", "stdout.json", "pt.parquet")):
    for f in files:
        if f.endswith(".parquet"):
            assert pq.read_table(ray / f).equals(pq.read_table(single / f)), f
        else:
            assert (ray / f).read_text() == (single / f).read_text(), f


def test_cli_topk_on_ray_with_progress(ray_cluster, converted, tmp_path, capsys):
    single, ray, err = cli_pair(capsys, tmp_path, converted / "base.topk.parquet",
                                [converted / "q4.npy", converted / "q4.topk.parquet"])
    assert_same_outputs(single, ray)
    assert json.loads((ray / "s.json").read_text())["kind"] == "topk_bounds"
    last = err.strip().splitlines()[-1]  # stderr is no terminal: a line at the end
    assert last.startswith("762/762 tokens (100.0%)") and "GB/s" in last and "workers on" in last


@pytest.mark.parametrize("row", [40, 600])
def test_cli_topk_on_ray_refuses_a_corrupt_llama_row_by_its_row_in_the_file(
        ray_cluster, converted, llama_base_path, tmp_path, capsys, row):
    """A llama.cpp reference with one zeroed row against a top-k dump: refused on the
    cluster as on one machine, naming the file and the row's number in the file (the tasks'
    ranges start at other rows; a range's rows used to go unscreened, exit 0)."""
    with open_source(llama_base_path) as src:
        n, row_bytes = src.n_tokens, 8 + 2 * src.vocab
    raw = bytearray(llama_base_path.read_bytes())
    at = len(raw) - (n - row) * row_bytes  # the rows end the file
    raw[at : at + row_bytes] = bytes(row_bytes)
    bad = tmp_path / "base.kld"
    bad.write_bytes(bytes(raw))
    errors = []
    for more in ([], ["--ray", "auto", "--ray-tasks", "4"]):
        code, out, err = run_cli(["compare", str(bad), str(converted / "q4.topk.parquet"), "-q", *more],
                                 capsys)
        assert code == 1 and out == "", (code, out, err)
        errors.append(err.strip().splitlines()[-1])
    for err in errors:
        assert f"{bad}: row {row} is corrupt (its log-probabilities sum to" in err, err
    assert errors[1].startswith("Error: tokens [") and "row_window" not in errors[1]


def test_cli_hidden_on_ray(ray_cluster, hidden_dumps, tmp_path, capsys):
    paths, _ = hidden_dumps
    single, ray, err = cli_pair(capsys, tmp_path, paths[0], paths[1:], per_prompt=True)
    assert_same_outputs(single, ray, ("s.json", "stdout.json", "pt.parquet", "pp.parquet"))
    assert err.strip().splitlines()[-1].startswith("300/300 tokens (100.0%)")


def test_cli_converted_llama_files_on_ray(ray_cluster, converted, llama_base_path, llama_q4_path,
                                         tmp_path, capsys):
    single, ray, _ = cli_pair(capsys, tmp_path, converted / "base.safetensors", [converted / "q4.npy"],
                              per_prompt=True)
    assert_same_outputs(single, ray, ("s.json", "stdout.json", "pt.parquet", "pp.parquet"))
    direct = tmp_path / "direct.json"
    code, _, err = run_cli(["compare", str(llama_base_path), str(llama_q4_path), "-q", "-o", str(direct)],
                           capsys)
    assert code == 0, err
    got = json.loads((ray / "s.json").read_text())["models"][0]["summary"]
    assert got == json.loads(direct.read_text())["models"][0]["summary"]
    assert got["llama_compat"]


# --- GPU workers: the wiring, without a GPU -------------------------------------------------

class FakeRay:
    """Stands in for the ray module on a cluster of one node with `gpus` GPUs: records the
    options and keyword arguments of every task, and runs each here on the CPU (device
    'cpu' in place of 'cuda'), so the rest of the path is checked too."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

    def __init__(self, gpus: int):
        self.gpus, self.options, self.calls = gpus, [], []

    def is_initialized(self):
        return True

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": float(self.gpus)}}]

    def remote(self, fn):
        fake = self

        class Remote:
            def options(self, **kw):
                fake.options.append(kw)
                return self

            def remote(self, *args, **kwargs):
                fake.calls.append(kwargs)
                here = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
                return lambda: fn(*args, **here)
        return Remote()

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()

    def cancel(self, ref, force):
        pass


@pytest.fixture
def fake_gpu_cluster(monkeypatch):
    fake = FakeRay(gpus=2)
    monkeypatch.setattr(distributed, "_ray", lambda: fake)
    return fake


def test_cuda_tasks_ask_for_a_gpu_and_run_the_gpu_path(fake_gpu_cluster, npy_dumps, capsys, tmp_path):
    """Never run on a GPU here: checks that --device cuda reaches Ray as num_gpus=1 and
    each task as device='cuda' (compare_range then compares through fidelity_kld.gpu)."""
    root, *_ = npy_dumps
    ref, quants = root / "ref", [root / "q2.npy"]
    dist = distributed.compare(ref, quants, tasks=3, device="cuda", threads=2)
    assert fake_gpu_cluster.options == [dict(num_cpus=2, num_gpus=1, max_retries=3,
                                             retry_exceptions=False)]
    assert len(fake_gpu_cluster.calls) >= 3
    assert all(c["device"] == "cuda" for c in fake_gpu_cluster.calls)
    assert_bitwise(single_machine(ref, quants), dist)
    code, _, err = run_cli(["compare", str(ref), str(quants[0]), "--ray", "auto", "--device", "cuda",
                            "-q", "-o", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert fake_gpu_cluster.options[-1]["num_gpus"] == 1 and fake_gpu_cluster.calls[-1]["device"] == "cuda"


def test_cuda_hidden_tasks_ask_for_a_gpu_topk_tasks_do_not(fake_gpu_cluster, hidden_dumps, converted,
                                                           capsys, tmp_path):
    paths, _ = hidden_dumps
    code, _, err = run_cli(["compare", *map(str, paths), "--ray", "auto", "--device", "cuda", "-q",
                            "-o", str(tmp_path / "h.json")], capsys)
    assert code == 0, err
    assert fake_gpu_cluster.options[-1]["num_gpus"] == 1
    assert fake_gpu_cluster.calls and all(c["device"] == "cuda" for c in fake_gpu_cluster.calls)
    fake_gpu_cluster.calls.clear()
    # the bounds are numpy on the CPU whatever --device says, on one machine as on Ray
    code, _, err = run_cli(["compare", str(converted / "base.topk.parquet"),
                            str(converted / "q4.topk.parquet"), "--ray", "auto", "--device", "cuda",
                            "-q", "-o", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    assert fake_gpu_cluster.options[-1]["num_gpus"] == 0
    assert not any("device" in c for c in fake_gpu_cluster.calls)


def test_a_top_k_file_a_worker_cannot_read_fails_the_run(ray_cluster, converted, tmp_path):
    """The driver validated the top-k file, then it was cut short on "shared storage": the
    range past its end fails, naming the range and the file, and nothing is returned."""
    import shutil

    from fidelity_kld.topk_compare import open_side

    q = tmp_path / "q4.topk.parquet"
    shutil.copy(converted / "q4.topk.parquet", q)
    sides = [open_side(converted / "base.topk.parquet"), open_side(q)]
    pq.write_table(pq.read_table(q).slice(0, 500), q)
    with pytest.raises(distributed.RangeFailed,
                       match=rf"tokens \[\d+, \d+\) .*{q} rows .*: {q}: 500 rows, not the 762"):
        distributed.compare_topk_sides(sides, [str(converted / "base.topk.parquet"), str(q)],
                                       [8000], tasks=3)


def test_cli_bad_top_k_row_is_named_by_its_file_row(ray_cluster, converted, tmp_path, capsys):
    """With --ray the driver reads a top-k file's labels and metadata only; the task that
    reads the bad row names it by its row in the file, as one machine does; no output."""
    import pyarrow as pa

    table = pq.read_table(converted / "q4.topk.parquet")
    tail = table.column("tail_mass").to_numpy().copy()
    tail[600] = 1.5
    bad = tmp_path / "bad.topk.parquet"
    pq.write_table(table.set_column(table.column_names.index("tail_mass"), "tail_mass",
                                    pa.array(tail)), bad)
    want = f"{bad}: row 600: tail mass 1.5 is outside [0, 1]"
    for extra in ([], ["--ray", "auto", "--ray-tasks", "4"]):
        out_json = tmp_path / "o.json"
        code, out, err = run_cli(["compare", str(converted / "base.topk.parquet"), str(bad), "-q",
                                  "-o", str(out_json), *extra], capsys)
        assert code == 1 and out == "" and not out_json.exists()
        assert len(err.strip().splitlines()) == 1 and want in err
        assert ("tokens [" in err) == bool(extra)


def test_a_cuda_task_compares_through_the_gpu_path(monkeypatch, npy_dumps, hidden_dumps):
    """Inside the task (run here, no Ray, no GPU): device='cuda' sends a range's chunks
    through fidelity_kld.gpu.PinnedStager, and a hidden-state range through
    hidden.compare_hidden's CUDA path, each replaced by a recorder doing the CPU's work."""
    from fidelity_kld import gpu, hidden, ops
    from fidelity_kld.io.hidden import HiddenDump

    calls = []

    class RecordingStager:
        def compare(self, *args, **kwargs):
            calls.append("compare")
            return ops.compare(*args, **kwargs)

        def compare_many(self, *args, **kwargs):
            calls.append("compare_many")
            return ops.compare_many(*args, **kwargs)

    monkeypatch.setattr(gpu, "PinnedStager", RecordingStager)
    root, *_ = npy_dumps
    kw = dict(threads=1, llama_parity=False, chunk_bytes=1 << 20)
    with open_source(root / "ref") as ref, open_source(root / "q1") as q1, \
            open_source(root / "q2.npy") as q2:
        rng = distributed.plan(ref, [q1, q2], tasks=3, prompt_ids=ref.prompt_ids)[1]
        y = ref.labels[rng.start:rng.stop]
        on_gpu = distributed.compare_range(rng, y, device="cuda", **kw)
        assert calls and set(calls) == {"compare_many"}  # the reference staged once per chunk
        n_calls = len(calls)
        on_cpu = distributed.compare_range(rng, y, device="cpu", **kw)
    assert len(calls) == n_calls  # the CPU task does not touch the GPU path
    for a, b in zip([on_gpu["shared"], *on_gpu["models"]], [on_cpu["shared"], *on_cpu["models"]]):
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)

    paths, _ = hidden_dumps
    tile = 7 * 3 * 1271 * 4
    ranges = []

    def recording_cuda(ref, qs, heads, labels, rows, start, stop):
        ranges.append((rows, start, stop))
        return hidden.compare_hidden(ref, qs, heads, tile_bytes=tile, start=start, stop=stop)

    monkeypatch.setattr(hidden, "_compare_hidden_cuda", recording_cuda)
    dumps = [HiddenDump(p) for p in paths]
    rng = distributed.TokenRange(0, 21, 42, distributed._hidden_piece(dumps[0], 21, 42),
                                 tuple(distributed._hidden_piece(d, 21, 42) for d in dumps[1:]))
    out = distributed.compare_hidden_range(rng, shared_lm_head=False, lm_head=None, tile_bytes=tile,
                                           threads=1, device="cuda")
    assert ranges == [(7, 21, 42)] and out["models"][0]["kld"].shape == (21,)
