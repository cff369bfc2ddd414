"""Per-prompt benchmark outcomes from the harnesses people use, as {task: {prompt_id: score}}.

Scores are in [0, 1] (1 = solved). Prompt ids are strings (integers are written in decimal),
so an lm-evaluation-harness doc_id 7, a CSV "7" and a Parquet int64 7 are the same prompt.

Readers (each takes a path and returns an `Outcomes`):

- lm-evaluation-harness `--log_samples`: `samples_<task>_<date>.jsonl` (or a directory of
  them, or .jsonl.gz), one line per (doc, filter): `doc_id`, `filter` (absent in older
  versions: "none"), `metrics` (newer versions: the metric names logged) and the metric
  values as top-level keys (`acc`, `acc_norm`, `exact_match`, `pass@1`,
  `prompt_level_strict_acc`, ...; list-valued ones such as `inst_level_strict_acc` score
  the mean). A task that logs several filters (gsm8k: strict-match and flexible-extract)
  needs one chosen explicitly.
- LiveCodeBench `*_eval_all.json`: a list of problems with `question_id`, `graded_list`
  and `pass@1` (the fraction of graded samples that passed).
- EvalPlus `eval_results.json`: `eval[task_id]` is a list of samples with `base_status` /
  `plus_status`; the score is the fraction of samples passing base and plus tests
  ("plus", HumanEval+/MBPP+) or base tests only ("base"). The task is `humaneval+`,
  `mbpp+` (or without the `+`).
- A plain table (CSV with a header, or JSONL) with columns `task`, `prompt_id`, `score`
  and optionally `model` (one file may hold a whole cohort).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

LM_EVAL_SAMPLES = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.jsonl(\.gz)?$")
# When a line logs several metrics and none is chosen, the first of these that is present.
LM_EVAL_METRIC_PREFERENCE = (
    "acc", "exact_match", "pass@1", "prompt_level_strict_acc", "acc_norm", "pass_at_1",
    "inst_level_strict_acc", "prompt_level_loose_acc", "f1", "em",
)
FORMATS = ("lm-eval", "livecodebench", "evalplus", "table")


class OutcomeError(ValueError):
    """A problem with an outcome file; the message starts with the file's path."""


@dataclass(frozen=True)
class Outcomes:
    """{task: {prompt_id: score in [0, 1]}} for one model, plus what the reader chose."""

    tasks: dict[str, dict[str, float]]
    notes: tuple[str, ...] = field(default=())

    def merged(self, other: "Outcomes", source: str) -> "Outcomes":
        both = set(self.tasks) & set(other.tasks)
        if both:
            raise OutcomeError(f"{source}: task {sorted(both)[0]!r} is given twice for one model")
        return Outcomes({**self.tasks, **other.tasks}, self.notes + other.notes)


def prompt_key(value, source: str = "") -> str:
    """Canonical string form of a prompt id (7, 7.0 and "7" are one prompt)."""
    if isinstance(value, bool) or value is None:
        raise OutcomeError(f"{source}: prompt id {value!r} is not an id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value)
    text = str(value).strip()
    if not text:
        raise OutcomeError(f"{source}: empty prompt id")
    return text


def as_score(value, source: str) -> float:
    """A score in [0, 1]: booleans are 0/1, lists score their mean (lm-eval's inst-level)."""
    if isinstance(value, list):
        if not value:
            raise OutcomeError(f"{source}: empty list where a score was expected")
        return sum(as_score(v, source) for v in value) / len(value)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "pass", "passed"):
            return 1.0
        if low in ("false", "fail", "failed"):
            return 0.0
        try:
            value = float(low)
        except ValueError:
            raise OutcomeError(f"{source}: score {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise OutcomeError(f"{source}: score {value!r} is not a number")
    v = float(value)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise OutcomeError(f"{source}: score {v!r} is outside [0, 1]")
    return v


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


@contextlib.contextmanager
def _reading(path: Path):
    """What reading a file's text can raise, as an OutcomeError naming the file."""
    try:
        yield
    except UnicodeDecodeError:
        raise OutcomeError(f"{path}: not UTF-8 text") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise OutcomeError(f"{path}: damaged gzip data ({e})") from None
    except csv.Error as e:
        raise OutcomeError(f"{path}: not a readable table ({e})") from None
    except RecursionError:
        raise OutcomeError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise OutcomeError(f"{path}: cannot read ({e.strerror or e})") from None


def _jsonl(path: Path):
    with _reading(path), _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise OutcomeError(f"{path}: line {lineno}: not JSON ({e.msg})") from None


def _json(path: Path):
    with _reading(path), _open_text(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise OutcomeError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "lm-eval"
    if LM_EVAL_SAMPLES.match(path.name) or (name.startswith("samples_") and ".jsonl" in name):
        return "lm-eval"
    if name.endswith(("eval_all.json", "eval_all.json.gz")):
        return "livecodebench"
    if name.endswith(("eval_results.json", "eval_results.json.gz")):
        return "evalplus"
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".jsonl", ".jsonl.gz")):
        return "table"
    raise OutcomeError(f"{path}: cannot tell which harness wrote this; give its format "
                       f"(one of {', '.join(FORMATS)})")


def read_outcomes(path, *, format: str | None = None, task: str | None = None,
                  filter: str | None = None, metric: str | None = None,
                  model: str | None = None, evalplus: str = "plus") -> Outcomes:
    """Read one outcome file (or an lm-eval output directory) in any supported format.

    task overrides the task name; filter / metric choose among what lm-eval logged (a
    dict {task: name} chooses per task); model selects rows of a multi-model table.
    """
    path = Path(path)
    if not path.exists():
        raise OutcomeError(f"{path}: no such file or directory")
    fmt = format or detect_format(path)
    if fmt == "lm-eval":
        return read_lm_eval(path, task=task, filter=filter, metric=metric)
    if fmt == "livecodebench":
        return read_livecodebench(path, task=task or "livecodebench")
    if fmt == "evalplus":
        return read_evalplus(path, task=task, variant=evalplus)
    if fmt == "table":
        return read_table(path, task=task, model=model)
    raise OutcomeError(f"{path}: unknown outcome format {fmt!r} (one of {', '.join(FORMATS)})")


def _per_task(choice, task):
    if isinstance(choice, dict):
        return choice.get(task)
    return choice


def read_lm_eval(path, *, task: str | None = None, filter=None, metric=None) -> Outcomes:
    """lm-evaluation-harness `--log_samples` output: one samples file, or a directory holding
    one per task (two files for one task, from two runs, are an error: name the one meant)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if LM_EVAL_SAMPLES.match(p.name))
        if not files:
            raise OutcomeError(f"{path}: no samples_<task>_<date>.jsonl files here")
        by_task: dict[str, list[Path]] = {}
        for p in files:
            by_task.setdefault(LM_EVAL_SAMPLES.match(p.name)["task"], []).append(p)
        out = Outcomes({})
        for name, paths in by_task.items():
            if len(paths) > 1:
                raise OutcomeError(f"{path}: {len(paths)} samples files for task {name!r} "
                                   f"({', '.join(p.name for p in paths)}); name the one to use")
            out = out.merged(read_lm_eval(paths[0], filter=filter, metric=metric), str(path))
        return out
    m = LM_EVAL_SAMPLES.match(path.name)
    if task is None:
        if m is None:
            raise OutcomeError(f"{path}: not named samples_<task>_<date>.jsonl; give the task")
        task = m["task"]
    want_filter = _per_task(filter, task)
    want_metric = _per_task(metric, task)

    by_filter: dict[str, dict[str, dict]] = {}
    for lineno, rec in _jsonl(path):
        where = f"{path}: line {lineno}"
        if not isinstance(rec, dict) or "doc_id" not in rec:
            raise OutcomeError(f"{where}: no doc_id (is this an lm-eval samples file?)")
        flt = rec.get("filter", "none")
        docs = by_filter.setdefault(flt, {})
        key = prompt_key(rec["doc_id"], where)
        if key in docs:
            raise OutcomeError(f"{where}: doc_id {key} appears twice for filter {flt!r}")
        docs[key] = rec | {"_where": where}
    if not by_filter:
        raise OutcomeError(f"{path}: no samples")
    if want_filter is None:
        if len(by_filter) > 1:
            raise OutcomeError(f"{path}: task {task!r} logs {len(by_filter)} filters "
                               f"({', '.join(sorted(by_filter))}); choose one (filter = \"...\")")
        want_filter = next(iter(by_filter))
    elif want_filter not in by_filter:
        raise OutcomeError(f"{path}: task {task!r} has no filter {want_filter!r} "
                           f"(it logs {', '.join(sorted(by_filter))})")
    docs = by_filter[want_filter]
    notes = []
    if want_metric is None:
        first = next(iter(docs.values()))
        logged = first.get("metrics")
        if not isinstance(logged, list) or not logged:
            logged = [k for k in LM_EVAL_METRIC_PREFERENCE if k in first]
        if not logged:
            raise OutcomeError(f"{first['_where']}: no metric found; choose one (metric = \"...\")")
        preferred = [k for k in LM_EVAL_METRIC_PREFERENCE if k in logged]
        want_metric = preferred[0] if preferred else logged[0]
        if len(logged) > 1:
            notes.append(f"{task}: scored by {want_metric} (also logged: "
                         f"{', '.join(k for k in logged if k != want_metric)})")
    scores = {}
    for key, rec in docs.items():
        if want_metric not in rec:
            raise OutcomeError(f"{rec['_where']}: no metric {want_metric!r}")
        scores[key] = as_score(rec[want_metric], f"{rec['_where']}: {want_metric}")
    return Outcomes({task: scores}, tuple(notes))


def read_livecodebench(path, *, task: str = "livecodebench") -> Outcomes:
    """LiveCodeBench `*_eval_all.json`: score = pass@1 (graded_list's pass fraction when
    pass@1 is absent)."""
    path = Path(path)
    data = _json(path)
    if not isinstance(data, list):
        raise OutcomeError(f"{path}: expected a list of problems (LiveCodeBench *_eval_all.json)")
    scores = {}
    for i, prob in enumerate(data):
        where = f"{path}: problem {i}"
        if not isinstance(prob, dict) or "question_id" not in prob:
            raise OutcomeError(f"{where}: no question_id")
        key = prompt_key(prob["question_id"], where)
        if key in scores:
            raise OutcomeError(f"{where}: question_id {key} appears twice")
        if prob.get("pass@1") is not None:
            scores[key] = as_score(prob["pass@1"], f"{where}: pass@1")
        elif isinstance(prob.get("graded_list"), list) and prob["graded_list"]:
            scores[key] = as_score([bool(g) for g in prob["graded_list"]], f"{where}: graded_list")
        else:
            raise OutcomeError(f"{where}: neither pass@1 nor a non-empty graded_list")
    if not scores:
        raise OutcomeError(f"{path}: no problems")
    return Outcomes({task: scores})


def _evalplus_status(sample: dict, which: str):
    if f"{which}_status" in sample:
        return sample[f"{which}_status"]
    old = sample.get(which)  # evalplus < 0.2: "base": [status, details]
    if isinstance(old, list) and old:
        return old[0]
    return None


def read_evalplus(path, *, task: str | None = None, variant: str = "plus") -> Outcomes:
    """EvalPlus `eval_results.json`: per task_id, the fraction of samples passing the base
    tests and (variant "plus") the extra tests."""
    if variant not in ("plus", "base"):
        raise OutcomeError(f"{path}: evalplus variant must be 'plus' or 'base', not {variant!r}")
    path = Path(path)
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("eval"), dict):
        raise OutcomeError(f"{path}: no 'eval' table (is this EvalPlus eval_results.json?)")
    by_task: dict[str, dict[str, float]] = {}
    for task_id, samples in data["eval"].items():
        where = f"{path}: {task_id}"
        if isinstance(samples, dict):
            samples = [samples]
        if not isinstance(samples, list) or not samples:
            raise OutcomeError(f"{where}: no samples")
        passed = []
        for s in samples:
            base = _evalplus_status(s, "base")
            if base is None:
                raise OutcomeError(f"{where}: no base_status")
            ok = base == "pass"
            if variant == "plus":
                plus = _evalplus_status(s, "plus")
                if plus is None:
                    raise OutcomeError(f"{where}: no plus_status (use evalplus = \"base\")")
                ok = ok and plus == "pass"
            passed.append(ok)
        name = task
        if name is None:
            name = task_id.split("/")[0].lower() + ("+" if variant == "plus" else "")
        by_task.setdefault(name, {})[prompt_key(task_id, where)] = sum(passed) / len(passed)
    if not by_task:
        raise OutcomeError(f"{path}: no tasks")
    return Outcomes(by_task)


def read_table_models(path, *, task: str | None = None) -> dict[str | None, Outcomes]:
    """A plain table of (model, task, prompt_id, score), CSV/TSV with a header or JSONL, as
    {model: Outcomes}; the key is None when the table has no model column. `task` fills a
    missing task column."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    rows = []
    if name.endswith(".jsonl"):
        for lineno, rec in _jsonl(path):
            if not isinstance(rec, dict):
                raise OutcomeError(f"{path}: line {lineno}: expected an object")
            rows.append((lineno, rec))
    else:
        with _reading(path), _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ",")
            if reader.fieldnames is None:
                raise OutcomeError(f"{path}: empty table")
            rows = list(enumerate(reader, 2))
    if not rows:
        raise OutcomeError(f"{path}: empty table")
    first = rows[0][1]
    for col in ("prompt_id", "score"):
        if col not in first:
            raise OutcomeError(f"{path}: no {col!r} column (need task, prompt_id, score; model optional)")
    if "task" not in first and task is None:
        raise OutcomeError(f"{path}: no 'task' column; give the task")
    has_model = "model" in first
    out: dict[str | None, dict[str, dict[str, float]]] = {}
    for lineno, rec in rows:
        where = f"{path}: line {lineno}"
        model = str(rec.get("model") or "").strip() if has_model else None
        if has_model and not model:
            raise OutcomeError(f"{where}: empty model")
        t = task if task is not None else str(rec.get("task") or "").strip()
        if not t:
            raise OutcomeError(f"{where}: empty task")
        key = prompt_key(rec.get("prompt_id"), where)
        scores = out.setdefault(model, {}).setdefault(t, {})
        if key in scores:
            raise OutcomeError(f"{where}: prompt {key} of task {t!r} appears twice"
                               + (f" for model {model!r}" if has_model else ""))
        scores[key] = as_score(rec.get("score"), f"{where}: score")
    return {m: Outcomes(tasks) for m, tasks in out.items()}


def select_model(tables: dict[str | None, Outcomes], model: str | None, path) -> Outcomes:
    """One model's outcomes from read_table_models' result."""
    if None in tables:
        return tables[None]
    if model is None:
        if len(tables) == 1:
            return next(iter(tables.values()))
        raise OutcomeError(f"{path}: rows for {len(tables)} models; say which model")
    if model not in tables:
        names = sorted(tables)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise OutcomeError(f"{path}: no rows for model {model!r} (models here: {shown})")
    return tables[model]


def read_table(path, *, task: str | None = None, model: str | None = None) -> Outcomes:
    """A plain table's outcomes for one model (`model` selects rows when the table has a
    model column)."""
    return select_model(read_table_models(path, task=task), model, path)
