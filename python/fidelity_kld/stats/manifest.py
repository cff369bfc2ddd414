"""Cohort manifests (TOML, JSON or CSV) and the loading of everything they point at.

TOML (JSON is the same structure); paths are relative to the manifest:

    name = "Example-8B GGUF quants"
    fidelity = "summary.json"          # one `fidelity-kld compare --output` for every model
    outcomes = "outcomes.csv"          # one (model, task, prompt_id, score) table for all
    weights = { gsm8k = 1, livecodebench = 2 }      # composite weights (default 1 each)
    filters = { gsm8k = "strict-match" }            # lm-eval filter per task, when several
    metrics = { gsm8k = "exact_match" }             # lm-eval metric per task
    zone_threshold = 0.02              # analysis defaults; command-line flags override
    primary = "kld_mean"
    routing = ["Q4_K_M", "IQ4_XS"]
    pool_flips = false                 # true: composite flips count each prompt once
    direction_groups = '^w(\d+)'       # docs/direction.md's hold-out: a prompt id's group

    [reference]
    name = "BF16"
    outcomes = ["lm_eval/bf16"]        # a file, an lm-eval output directory, or a list

    [[models]]
    name = "Q4_K_M"
    bpw = 4.89
    size_gb = 4.92
    fidelity = "q4km.json"             # its own summary (else the cohort-wide one)
    fidelity_name = "Q4_K_M.gguf"      # its name in that summary (default: name)
    per_prompt = "pp/q4km.parquet"     # or { livecodebench = "pp/q4km_lcb.parquet" }
    outcomes = [{ path = "lcb/q4km_eval_all.json" }, { path = "evalplus/q4km.json", format = "evalplus" }]
    [models.variants]                  # extra fidelity variants, any names
    kld_code_ctx8k = 0.031

An outcome entry is a path or a table: path, and optionally format (lm-eval,
livecodebench, evalplus, table), task, filter, metric, evalplus ("plus" or "base"),
model (its name in a multi-model table; default the entry's `outcome_name` or name).

CSV: one row per model with columns name, role (one row "reference"), and optionally
fidelity, fidelity_name, per_prompt, outcomes (paths joined by ";"), filter, size_gb, bpw;
any other column is an extra fidelity variant (the reference row's value, if any, is the
variant's value for the reference against itself).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import variants as variant_defs
from .cohort_data import Cohort
from .direction_cohort import direction_data_from_summaries
from .outcomes import (OutcomeError, Outcomes, prompt_key, read_outcomes, read_table_models,
                       detect_format, select_model)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

TOP_KEYS = {"name", "reference", "models", "fidelity", "outcomes", "weights", "filters", "metrics",
            "zone_threshold", "thresholds", "primary", "routing", "fail_below", "seed", "bootstrap",
            "holdout_reps", "evalplus", "pool_flips", "direction_groups"}
MODEL_KEYS = {"name", "fidelity", "fidelity_name", "per_prompt", "outcomes", "outcome_name",
              "variants", "size_gb", "bpw"}
OUTCOME_KEYS = {"path", "format", "task", "filter", "metric", "evalplus", "model"}
CSV_COLUMNS = {"name", "role", "fidelity", "fidelity_name", "per_prompt", "outcomes", "outcome_name",
               "filter", "metric", "size_gb", "bpw"}
OPTION_KEYS = {"zone_threshold": "zone_threshold", "thresholds": "thresholds", "primary": "primary",
               "routing": "routing", "fail_below": "fail_below", "seed": "seed",
               "bootstrap": "n_bootstrap", "holdout_reps": "holdout_reps", "pool_flips": "pool_flips",
               "direction_groups": "direction_groups"}


class ManifestError(ValueError):
    """A problem with a manifest or a file it names; the message starts with the file."""


@dataclass(frozen=True)
class LoadedManifest:
    cohort: Cohort
    options: dict = field(default_factory=dict)  # analysis defaults the manifest sets
    path: str = ""


def load_manifest(path, *, intersect: bool = False) -> LoadedManifest:
    """Read a manifest file and everything it names into a Cohort."""
    path = Path(path)
    data = _parse_manifest(path)
    return manifest_from_dict(data, base_dir=path.parent, source=str(path), intersect=intersect)


def manifest_inputs(path) -> list[Path]:
    """Every file a manifest names (fidelity summaries, per-prompt files, outcome files and
    the files inside outcome directories), resolved as the loader resolves them, none of
    them read: what a command writing outputs must not overwrite (io.paths.check_outputs)."""
    path = Path(path)
    data = _parse_manifest(path)
    loader = _Loader(path.parent, str(path), data)
    models = data.get("models")
    holders = [data, data.get("reference"), *(models if isinstance(models, list) else [])]
    named = []
    for holder in (h for h in holders if isinstance(h, dict)):
        per_prompt, outcomes = holder.get("per_prompt"), holder.get("outcomes")
        values = [holder.get("fidelity"),
                  *(per_prompt.values() if isinstance(per_prompt, dict) else [per_prompt]),
                  *(o.get("path") if isinstance(o, dict) else o
                    for o in (outcomes if isinstance(outcomes, list) else [outcomes]))]
        named += [loader.path(v) for v in values if isinstance(v, str) and v.strip()]
    files = []
    for p in named:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def _parse_manifest(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        elif suffix == ".csv":
            data = _csv_manifest(path)
        else:
            raise ManifestError(f"{path}: a manifest is .toml, .json or .csv")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a table of keys, not {type(data).__name__}")
    return data


def _csv_manifest(path: Path) -> dict:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "name" not in rows[0]:
        raise ManifestError(f"{path}: a CSV manifest needs a header with a 'name' column")
    if "role" in rows[0]:
        refs = [r for r in rows if (r.get("role") or "").strip().lower() == "reference"]
        if len(refs) != 1:
            raise ManifestError(f"{path}: exactly one row needs role 'reference' ({len(refs)} found)")
        ref = refs[0]
        quants = [r for r in rows if r is not ref]
    else:
        raise ManifestError(f"{path}: no 'role' column; mark the reference row with role = reference")
    extra = [c for c in rows[0] if c not in CSV_COLUMNS]

    def entry(row, lineno):
        e = {"name": row["name"].strip()}
        for k in ("fidelity", "fidelity_name", "per_prompt", "outcome_name"):
            if (row.get(k) or "").strip():
                e[k] = row[k].strip()
        for k in ("size_gb", "bpw"):
            if (row.get(k) or "").strip():
                e[k] = _csv_number(row[k], path, lineno, k)
        outs = [p.strip() for p in (row.get("outcomes") or "").split(";") if p.strip()]
        if outs:
            e["outcomes"] = [{"path": p, **{k: row[k].strip() for k in ("filter", "metric")
                                           if (row.get(k) or "").strip()}} for p in outs]
        vals = {c: _csv_number(row[c], path, lineno, c) for c in extra if (row.get(c) or "").strip()}
        if vals:
            e["variants"] = vals
        return e

    lines = {id(r): i for i, r in enumerate(rows, 2)}
    return {"reference": entry(ref, lines[id(ref)]),
            "models": [entry(r, lines[id(r)]) for r in quants]}


def _csv_number(text, path, lineno, col) -> float:
    try:
        return float(text)
    except ValueError:
        raise ManifestError(f"{path}: line {lineno}: {col} {text!r} is not a number") from None


def _check_keys(d, allowed, where, source):
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: {where} must be a table")
    unknown = set(d) - allowed
    if unknown:
        raise ManifestError(f"{source}: {where}: unknown key {sorted(unknown)[0]!r} "
                            f"(allowed: {', '.join(sorted(allowed))})")


def manifest_from_dict(data: dict, *, base_dir=".", source: str = "manifest",
                       intersect: bool = False) -> LoadedManifest:
    """Build a Cohort from a parsed manifest; paths are relative to base_dir."""
    base = Path(base_dir)
    _check_keys(data, TOP_KEYS, "top level", source)
    if "reference" not in data or "models" not in data:
        raise ManifestError(f"{source}: needs a [reference] table and [[models]] entries")
    ref = data["reference"]
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ManifestError(f"{source}: [[models]] must list at least one quantized model")
    entries = [ref, *models]
    for i, e in enumerate(entries):
        _check_keys(e, MODEL_KEYS, "reference" if i == 0 else f"models[{i - 1}]", source)
        where = "reference" if i == 0 else f"models[{i - 1}]"
        if not str(e.get("name", "")).strip():
            raise ManifestError(f"{source}: {where} has no name")
        if not isinstance(e.get("variants", {}), dict):
            raise ManifestError(f"{source}: {where}: variants must be a table {{name = value}}")
    names = [str(e["name"]) for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ManifestError(f"{source}: model name {sorted(dup)[0]!r} appears twice")

    loader = _Loader(base, source, data)
    outcomes = [loader.outcomes(e) for e in entries]
    notes = sorted({n for o in outcomes for n in o.notes})
    tasks, prompt_ids, scores, task_notes = _align(names, outcomes, intersect, source)
    notes += task_notes

    weights_in = data.get("weights", {}) or {}
    if not isinstance(weights_in, dict):
        raise ManifestError(f"{source}: weights must be a table {{task = weight}}")
    unknown = set(weights_in) - set(tasks)
    if unknown:
        raise ManifestError(f"{source}: weights: no task {sorted(unknown)[0]!r} in the outcomes "
                            f"(tasks: {', '.join(tasks)})")
    if weights_in and set(tasks) - set(weights_in):
        notes.append(f"weights: {', '.join(t for t in tasks if t not in weights_in)} not listed; weight 1")

    quant = entries[1:]
    var_values: dict[str, list[float]] = {}
    fidelity_entries = [loader.fidelity_entry(e) for e in quant]
    for i, e in enumerate(quant):
        for name, v in loader.fidelity(e).items():
            var_values.setdefault(name, [math.nan] * len(quant))[i] = v
    direction = direction_data_from_summaries(fidelity_entries)
    per_prompt: dict[str, np.ndarray] = {}
    prompt_means = [math.nan] * len(quant)
    for i, e in enumerate(quant):
        if "per_prompt" not in e:
            continue
        by_task, mean_all = loader.per_prompt(e, tasks, prompt_ids)
        prompt_means[i] = mean_all
        for t, vec in by_task.items():
            per_prompt.setdefault(t, np.full((len(quant), len(prompt_ids[t])), np.nan))[i] = vec
    if not all(np.isnan(prompt_means)):
        var_values["prompt_kld_mean"] = prompt_means
    notes += sorted(loader.notes)
    extras = {}
    for i, e in enumerate(quant):
        for name, v in (e.get("variants") or {}).items():
            if name in variant_defs.BUILTIN_NAMES:
                raise ManifestError(
                    f"{source}: {e['name']}: variant {name!r} is built in (read from the fidelity summary); "
                    f"name yours differently, e.g. {'my_' + name!r}, lead with it with --primary "
                    f"{'my_' + name} (or primary = \"my_{name}\"), and give the reference's own value "
                    f"([reference] variants = {{my_{name} = 0.0}}) so the range-restriction null has an anchor")
            extras.setdefault(name, [math.nan] * len(quant))[i] = _number(v, source, f"{e['name']}: variants.{name}")
    ordered = {n: var_values[n] for n in variant_defs.BUILTIN_NAMES if n in var_values}
    ordered.update(extras)
    ref_values = {name: _number(v, source, f"reference: variants.{name}")
                  for name, v in (ref.get("variants") or {}).items()}
    for name in extras:
        if name in ref_values:
            continue
        # unknown unless the reference entry gives it or the name declares it (a KLD: 0)
        ref_values[name] = variant_defs.identity_value(name)
        if math.isfinite(ref_values[name]):
            notes.append(f"variant {name}: reference value {ref_values[name]:g} assumed from its name "
                         f"(set [reference] variants = {{{name} = ...}} to change it)")
        else:
            notes.append(f"variant {name}: no reference value (set [reference] variants = {{{name} = ...}}); "
                         "its range-restriction null has no anchor at the reference")

    cohort = Cohort(
        reference=names[0], models=tuple(names[1:]), tasks=tasks, prompt_ids=prompt_ids,
        scores=scores, variants={k: np.asarray(v, float) for k, v in ordered.items()},
        variant_reference=ref_values, per_prompt_kld=per_prompt,
        weights={t: _number(weights_in.get(t, 1.0), source, f"weights.{t}") for t in tasks},
        size_gb=np.array([_number(e.get("size_gb", math.nan), source, f"{e['name']}: size_gb") for e in quant]),
        bpw=np.array([_number(e.get("bpw", math.nan), source, f"{e['name']}: bpw") for e in quant]),
        name=str(data.get("name", Path(source).stem)), notes=tuple(notes), direction=direction)
    options = {OPTION_KEYS[k]: data[k] for k in OPTION_KEYS if k in data}
    if "thresholds" in options:
        options["thresholds"] = tuple(options["thresholds"])
    if "routing" in options:
        options["routing"] = tuple(options["routing"])
    return LoadedManifest(cohort, options, source)


def _number(v, source, where) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ManifestError(f"{source}: {where}: {v!r} is not a number")
    try:
        return variant_defs.summary_number(v)
    except ValueError:
        raise ManifestError(f"{source}: {where}: {v!r} is not a number") from None


def _natural(ids):
    try:
        return sorted(ids, key=int)
    except ValueError:
        return sorted(ids)


def _align(names, outcomes: list[Outcomes], intersect: bool, source: str):
    """Common tasks and, per task, the common prompt set; differences are an error unless
    intersect, which keeps what every model has and says what it dropped."""
    notes = []
    all_tasks = []
    for o in outcomes:
        for t in o.tasks:
            if t not in all_tasks:
                all_tasks.append(t)
    problems = []
    tasks = []
    for t in all_tasks:
        lacking = [n for n, o in zip(names, outcomes) if t not in o.tasks]
        if lacking:
            if intersect:
                notes.append(f"{t}: dropped (no outcomes for {', '.join(lacking[:5])}"
                             f"{', ...' if len(lacking) > 5 else ''})")
            else:
                problems.append(f"task {t!r} has no outcomes for {', '.join(lacking[:5])}"
                                f"{' and others' if len(lacking) > 5 else ''}")
            continue
        tasks.append(t)
    prompt_ids, scores = {}, {}
    for t in list(tasks):
        sets = [set(o.tasks[t]) for o in outcomes]
        common = set.intersection(*sets)
        ref_set = sets[0]
        for n, s in zip(names[1:], sets[1:]):
            if s != ref_set and not intersect:
                missing, extra = _natural(ref_set - s), _natural(s - ref_set)
                parts = []
                if missing:
                    parts.append(f"lacks {len(missing)} prompt(s) the reference has ({_few(missing)})")
                if extra:
                    parts.append(f"has {len(extra)} the reference lacks ({_few(extra)})")
                problems.append(f"task {t!r}: {n} " + " and ".join(parts))
        union = set.union(*sets)
        if intersect and len(common) < len(union):
            notes.append(f"{t}: {len(union) - len(common)} of {len(union)} prompts dropped "
                         f"(not scored for every model)")
        if not common:
            if intersect:
                notes.append(f"{t}: dropped (no prompt scored for every model)")
                tasks.remove(t)
                continue
        ids = _natural(common)
        prompt_ids[t] = tuple(ids)
        scores[t] = np.array([[o.tasks[t][i] for i in ids] for o in outcomes], float)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ManifestError(f"{source}: prompt sets differ across models: " + "; ".join(problems[:3])
                            + more + "; fix the outcomes or pass --intersect")
    if not tasks:
        raise ManifestError(f"{source}: no task has outcomes for every model")
    return tuple(tasks), prompt_ids, scores, notes


def _few(ids, k=5):
    return ", ".join(ids[:k]) + (", ..." if len(ids) > k else "")


class _Loader:
    """Reads the files a manifest names, each once."""

    def __init__(self, base: Path, source: str, data: dict):
        self.base, self.source, self.data = base, source, data
        self._json: dict[Path, dict] = {}
        self._tables: dict[tuple, dict] = {}
        self.notes: set[str] = set()

    def path(self, p) -> Path:
        if not isinstance(p, str) or not p.strip():
            raise ManifestError(f"{self.source}: expected a path, got {p!r}")
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base / q

    # ------------------------------------------------------------------ outcomes
    def outcomes(self, entry: dict) -> Outcomes:
        specs = []
        for where, value in (("entry", entry.get("outcomes")), ("cohort", self.data.get("outcomes"))):
            if value is None:
                continue
            for spec in (value if isinstance(value, list) else [value]):
                specs.append((where, spec))
        if not specs:
            raise ManifestError(f"{self.source}: {entry['name']}: no outcomes")
        out = Outcomes({})
        for where, spec in specs:
            if isinstance(spec, str):
                spec = {"path": spec}
            _check_keys(spec, OUTCOME_KEYS, f"{entry['name']}: outcomes", self.source)
            if "path" not in spec:
                raise ManifestError(f"{self.source}: {entry['name']}: an outcome entry has no path")
            p = self.path(spec["path"])
            model = spec.get("model", entry.get("outcome_name", entry["name"]))
            try:
                fmt = spec.get("format") or (detect_format(p) if p.exists() else None)
                if fmt == "table":
                    key = (p, spec.get("task"))
                    if key not in self._tables:
                        self._tables[key] = read_table_models(p, task=spec.get("task"))
                    tables = self._tables[key]
                    if where == "cohort" and None in tables:
                        raise ManifestError(f"{p}: an outcome table shared by the cohort needs a 'model' column")
                    # a model's own table may name it differently when it holds one model only
                    got = select_model(tables, model if where == "cohort" or len(tables) > 1 else None, p)
                else:
                    got = read_outcomes(p, format=fmt, task=spec.get("task"),
                                        filter=spec.get("filter", self.data.get("filters")),
                                        metric=spec.get("metric", self.data.get("metrics")),
                                        evalplus=spec.get("evalplus", self.data.get("evalplus", "plus")))
                out = out.merged(got, f"{p}")
            except OutcomeError as e:
                raise ManifestError(str(e)) from None
        return out

    # ------------------------------------------------------------------ fidelity
    def _read_json(self, p: Path):
        if p not in self._json:
            if not p.is_file():
                raise ManifestError(f"{p}: no such fidelity summary")
            try:
                with open(p, encoding="utf-8") as fh:
                    self._json[p] = json.load(fh)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
        return self._json[p]

    def fidelity_entry(self, entry: dict) -> dict | None:
        """The model's entry in its fidelity summary ({"summary": ..., and whatever else the
        file gives it, e.g. "calibration_windows"}), or None without a summary."""
        got = self._fidelity_summary(entry)
        return None if got is None else got[2]

    def fidelity(self, entry: dict) -> dict[str, float]:
        got = self._fidelity_summary(entry)
        if got is None:
            return {}
        p, want, found = got
        try:
            return variant_defs.from_summary(found["summary"])
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{p}: model {want!r}: {e}") from None

    def _fidelity_summary(self, entry: dict) -> tuple[Path, str, dict] | None:
        """(file, the model's name there, its entry with a checked "summary"), or None."""
        own = "fidelity" in entry
        value = entry.get("fidelity", self.data.get("fidelity"))
        if value is None:
            return None
        p = self.path(value)
        data = self._read_json(p)
        want = entry.get("fidelity_name", entry["name"])
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            found = [m for m in data["models"] if isinstance(m, dict) and str(m.get("name")) == want]
            if not found and own and len(data["models"]) == 1:
                found = data["models"]
            if not found:
                have = [str(m.get("name")) for m in data["models"] if isinstance(m, dict)]
                raise ManifestError(f"{p}: no model named {want!r} (models here: {_few(have, 8)}); "
                                    f"set fidelity_name")
            model = found[0]
            summary = model.get("summary")
        elif isinstance(data, dict) and "kld" in data:
            if not own:
                raise ManifestError(f"{p}: a single summary cannot serve every model; give each its own")
            summary = data
            model = {"summary": data}
        else:
            found_keys = ", ".join(sorted(map(str, data))[:10]) if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{p}: not a fidelity summary: expected a compare summary with key 'models' "
                                f"(a list of {{\"name\", \"summary\"}}) or one Summary with key 'kld'; "
                                f"found {found_keys or 'no keys'} (see docs/cohort.md)")
        if not isinstance(summary, dict) or "kld" not in summary:
            have = ", ".join(sorted(map(str, summary))[:10]) if isinstance(summary, dict) else "no summary"
            raise ManifestError(f"{p}: model {want!r}: expected a 'summary' with key 'kld' "
                                f"({{\"kld\": {{\"mean\": ...}}, ...}}); found {have or 'no keys'} "
                                "(see docs/cohort.md)")
        return p, want, model

    # ------------------------------------------------------------------ per-prompt
    def per_prompt(self, entry: dict, tasks, prompt_ids) -> tuple[dict[str, np.ndarray], float]:
        """Per task, the per-prompt mean KLD aligned to the task's prompts (NaN where the
        file lacks one), and the mean over every prompt in the files."""
        value = entry["per_prompt"]
        if isinstance(value, dict):
            unknown = set(value) - set(tasks)
            if unknown:
                raise ManifestError(f"{self.source}: {entry['name']}: per_prompt names task "
                                    f"{sorted(unknown)[0]!r}, which has no outcomes")
            files = [(t, self.path(v)) for t, v in value.items()]
        else:
            files = [(None, self.path(value))]
        by_task, all_values = {}, []
        for task, p in files:
            ids, kld, file_tasks = _read_per_prompt(p, entry.get("fidelity_name", entry["name"]))
            all_values.append(kld)
            if file_tasks is not None:
                keys = list(zip(file_tasks, ids))
            elif task is not None:
                keys = [(task, i) for i in ids]
            else:
                keys = None
            if keys is None:
                idset = set(ids)
                hit = [t for t in tasks if idset & set(prompt_ids[t])]
                if len(hit) > 1:
                    raise ManifestError(f"{p}: prompt ids match tasks {hit[0]!r} and {hit[1]!r}; give "
                                        f"per_prompt as {{task = path}} or add a 'task' column")
                if not hit:
                    # per-prompt KLD on a fidelity corpus, not on the benchmark's prompts: it
                    # still gives prompt_kld_mean, but no failure prediction or routing
                    self.notes.add(f"{entry['name']}: per-prompt ids in {p.name} match no benchmark "
                                   "prompt; used for prompt_kld_mean only")
                    continue
                keys = [(hit[0], i) for i in ids]
            lookup = {}
            for k, v in zip(keys, kld):
                if k in lookup:
                    raise ManifestError(f"{p}: prompt {k[1]} appears twice")
                lookup[k] = v
            matched = 0
            for t in tasks:
                vec = np.array([lookup.get((t, i), np.nan) for i in prompt_ids[t]], float)
                hits = int(np.sum([(t, i) in lookup for i in prompt_ids[t]]))
                if hits:
                    matched += hits
                    if t in by_task:
                        raise ManifestError(f"{p}: task {t!r} has per-prompt KLD from two files")
                    by_task[t] = vec
            if not matched:
                raise ManifestError(f"{p}: no prompt id matches the prompts of "
                                    f"{'task ' + repr(task) if task else 'its tasks'}")
        values = np.concatenate(all_values)
        values = values[~np.isnan(values)]
        return by_task, float(np.mean(values)) if values.size else math.nan


PER_PROMPT_HINT = ("a per-prompt table has columns prompt_id and kld_mean (task and model "
                   "optional): compare --per-prompt's Parquet, or CSV/TSV with that header, or JSONL "
                   "with those keys; see docs/cohort.md")


def _read_per_prompt(p: Path, model: str | None = None):
    """(prompt ids as keys, kld_mean, task column or None) from a per-prompt table: compare's
    per-prompt Parquet, or a CSV/TSV/JSONL (optionally .gz) with the same columns. A file
    covering several models (a `model` column, as `compare --per-prompt` writes for more
    than one quant) is filtered to `model`."""
    if not p.is_file():
        raise ManifestError(f"{p}: no such per-prompt file")
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv", ".jsonl")):
        columns = _per_prompt_text(p, name)
    else:
        columns = _per_prompt_parquet(p)
    if "model" in columns:
        names = [str(m) for m in columns["model"]]
        if len(set(names)) > 1:  # a single-model file may name its model differently
            if model not in set(names):
                raise ManifestError(f"{p}: no rows for model {model!r} (the file holds "
                                    f"{', '.join(sorted(set(names))[:5])})")
            keep = [n == model for n in names]
            columns = {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in columns.items()}
    ids = [prompt_key(v, str(p)) for v in columns["prompt_id"]]
    kld = np.array([_per_prompt_number(v, p) for v in columns["kld_mean"]], float)
    if np.any(kld < -1e-6):
        raise ManifestError(f"{p}: negative kld_mean")
    kld = np.maximum(kld, 0.0)  # rounding can leave -1e-12 where two prompts' logits agree
    tasks = [str(t) for t in columns["task"]] if "task" in columns else None
    return ids, kld, tasks


def _per_prompt_number(v, p: Path) -> float:
    if v is None or (isinstance(v, str) and not v.strip()):
        return math.nan
    try:
        return variant_defs.summary_number(v)
    except (TypeError, ValueError):
        raise ManifestError(f"{p}: kld_mean {v!r} is not a number") from None


def _per_prompt_parquet(p: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
        cols = [c for c in ("prompt_id", "kld_mean", "task", "model") if c in schema.names]
        if "prompt_id" not in cols or "kld_mean" not in cols:
            raise ManifestError(f"{p}: no {'prompt_id' if 'prompt_id' not in cols else 'kld_mean'} column "
                                f"(found: {', '.join(schema.names[:8])}); {PER_PROMPT_HINT}")
        table = pq.read_table(p, columns=cols)
    except ManifestError:
        raise
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise ManifestError(f"{p}: cannot read Parquet ({e}); {PER_PROMPT_HINT}") from None
    return {c: table.column(c).to_pylist() for c in cols}


def _per_prompt_text(p: Path, name: str) -> dict[str, list]:
    from .outcomes import _jsonl, _open_text

    try:
        if name.endswith(".jsonl"):
            rows = []
            for lineno, rec in _jsonl(p):
                if not isinstance(rec, dict):
                    raise ManifestError(f"{p}: line {lineno}: expected an object; {PER_PROMPT_HINT}")
                rows.append(rec)
        else:
            with _open_text(p) as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ","))
    except OutcomeError as e:
        raise ManifestError(f"{e}; {PER_PROMPT_HINT}") from None
    except (UnicodeDecodeError, OSError, csv.Error) as e:
        raise ManifestError(f"{p}: cannot read ({e}); {PER_PROMPT_HINT}") from None
    if not rows:
        raise ManifestError(f"{p}: empty per-prompt table; {PER_PROMPT_HINT}")
    found = list(rows[0])
    for col in ("prompt_id", "kld_mean"):
        if col not in found:
            raise ManifestError(f"{p}: no {col} column (found: {', '.join(found[:8]) or 'none'}); "
                                f"{PER_PROMPT_HINT}")
    cols = [c for c in ("prompt_id", "kld_mean", "task", "model") if c in found]
    return {c: [r.get(c) for r in rows] for c in cols}
