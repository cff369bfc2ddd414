"""Text and Markdown formatting of `compare`'s results: the llama.cpp-style summary, the
compact one-row-per-model table, paired comparisons, the most divergent tokens and the
running per-prompt lines. Formatting only: every number comes from fidelity_kld.stats.

Numbers keep at least three significant digits (a near-lossless quant's mean KLD of 2.5e-5
prints as 0.0000251, not 0.000025), and a value and its error share one number of decimals.
JSON output keeps full precision.
"""

from __future__ import annotations

import math

SIG_DIGITS = 3
MAX_DECIMALS = 12


def _num(v) -> float:
    if v is None:
        return math.nan
    return float(v)  # 'inf' / '-inf' strings from json_ready included


def decimals(x: float, minimum: int = 6, digits: int = SIG_DIGITS) -> int:
    """Decimals that show `digits` significant digits of x (never fewer than `minimum`)."""
    x = _num(x)
    if not math.isfinite(x) or x == 0:
        return minimum
    return int(min(MAX_DECIMALS, max(minimum, digits - 1 - math.floor(math.log10(abs(x))))))


def num(x, minimum: int = 6, width: int = 0) -> str:
    x = _num(x)
    return f"{x:{width}.{decimals(x, minimum)}f}"


def pm(value, se, minimum: int = 6, width: int = 10, sep: str = " ± ",
       se_width: int | None = None) -> str:
    """'value ± se' with one number of decimals showing at least three significant digits of both."""
    d = max(decimals(value, minimum), decimals(se, minimum))
    return f"{_num(value):{width}.{d}f}{sep}{_num(se):{width if se_width is None else se_width}.{d}f}"


def _pct(x) -> float:
    return 100 * _num(x)


# --- the llama.cpp-style summary -------------------------------------------------------


def format_summary(s: dict) -> str:
    """llama-perplexity --kl-divergence's final statistics: the same sections, names and order,
    a blank line before each section as llama.cpp prints them (plus the 95% KLD line newer
    versions print, without the duplicated 99% line), then our extras. Numbers keep three
    significant digits where llama.cpp's fixed decimals would hide them."""
    g = _getter(s)
    lines: list[str] = []
    if s.get("has_labels"):
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {pm(g('ppl_q'), g('ppl_q_se'))}",
            f"Mean PPL(base)                : {pm(g('ppl_ref'), g('ppl_ref_se'))}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * g('cor_nll'):6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {pm(g('ln_ppl_ratio'), g('ln_ppl_ratio_se'))}",
            f"Mean PPL(Q)/PPL(base)         : {pm(g('ppl_ratio'), g('ppl_ratio_se'))}",
            f"Mean PPL(Q)-PPL(base)         : {pm(g('ppl_diff'), g('ppl_diff_se'))}",
            "",
        ]
    k = _getter(s["kld"])
    kp = _getter(s["kld"]["percentiles"])
    lines += [
        "====== KL divergence statistics ======",
        f"Mean    KLD: {pm(k('mean'), k('se'))}",
        f"Maximum KLD: {num(k('max'), width=10)}",
        f"99.9%   KLD: {num(kp('99.9'), width=10)}",
        f"99.0%   KLD: {num(kp('99'), width=10)}",
        f"95.0%   KLD: {num(kp('95'), width=10)}",
        f"Median  KLD: {num(k('median'), width=10)}",
        f"10.0%   KLD: {num(kp('10'), width=10)}",
        f" 5.0%   KLD: {num(kp('5'), width=10)}",
        f" 1.0%   KLD: {num(kp('1'), width=10)}",
        f"Minimum KLD: {num(k('min'), width=10)}",
        "",
        "====== Token probability statistics ======",
    ]
    if s.get("has_labels"):
        d = _getter(s["delta_p"])
        dp = _getter(s["delta_p"]["percentiles"])
        lines += [
            f"Mean    Δp: {pm(_pct(d('mean')), _pct(d('se')), 3, 6)} %",
            f"Maximum Δp: {num(_pct(d('max')), 3, 6)}%",
        ]
        for key, label in (("99.9", "99.9%"), ("99", "99.0%"), ("95", "95.0%"), ("90", "90.0%"),
                           ("75", "75.0%")):
            lines.append(f"{label:<8}Δp: {num(_pct(dp(key)), 3, 6)}%")
        lines.append(f"Median  Δp: {num(_pct(d('median')), 3, 6)}%")
        for key, label in (("25", "25.0%"), ("10", "10.0%"), ("5", " 5.0%"), ("1", " 1.0%"),
                           ("0.1", " 0.1%")):
            lines.append(f"{label:<8}Δp: {num(_pct(dp(key)), 3, 6)}%")
        lines += [
            f"Minimum Δp: {num(_pct(d('min')), 3, 6)}%",
            f"RMS Δp    : {pm(_pct(g('rms_delta_p')), _pct(g('rms_delta_p_se')), 3, 6)} %",
        ]
    lines.append(f"Same top p: {pm(_pct(g('same_top')), _pct(g('same_top_se')), 3, 6)} %")
    r = _getter(s["kld_reverse"])
    lines += [
        "",
        "====== fidelity-kld extras ======",
        f"Mean reverse KLD KL(Q||base): {pm(r('mean'), r('se'))}",
        f"Mean entropy of base        : {num(g('entropy_ref_mean'), width=10)}",
        f"Tokens: {s['n_tokens']} ({s['n_invalid']} invalid, excluded; "
        f"{s['n_kld_inf']} with infinite KLD)",
    ]
    if s.get("llama_compat"):
        lines.append("Definitions: llama.cpp's (KLD over base log-probs > -16, float32 percentiles; "
                     "per-token column kld_llama)")
    else:
        lines.append("Definitions: exact (full-vocabulary softmax; per-token column kld)")
    return "\n".join(lines)


# --- direction metrics (issue 16) ---------------------------------------------------------

# (key, label, percent?) of the scalar lines, in print order; a line is left out when its
# outputs are absent (the key is None), so a run without labels shows TVD, JSD and the rest
_DIRECTION_LINES = (
    ("dnll_mean", "Mean Δnll = ln(PPL(Q)/PPL(base))", False),
    ("dnll_harm", "Mean harm  max(0, Δnll)", False),
    ("dnll_help", "Mean help  max(0, -Δnll)", False),
    ("flip_harm", "Flips base right, Q wrong", True),
    ("flip_help", "Flips base wrong, Q right", True),
    ("flip_net", "Net flips (harm - help)", True),
    ("top5_lost", "Label left the top 5", True),
    ("top5_gained", "Label entered the top 5", True),
    ("top5_net", "Net top-5 losses", True),
    ("margin_harm", "Mean margin loss", False),
    ("tvd_mean", "Mean TVD", False),
    ("jsd_mean", "Mean JSD", False),
    ("kld_confident", "Mean KLD, p_base(top1) >= 0.5", False),
)


def format_direction(d: dict) -> str:
    """The direction metrics of one model (stats.direction.summarize_direction's dict, JSON
    ready): Δnll parts, flips and top-5 changes against the label, margin loss, TVD, JSD and
    the confident-token KLD, each ± its SE (rates in percent), then the KLD split by the base's
    top-1 probability and by whether the base's top-1 is the label. Numbers as the summary's."""
    g = _getter(d)
    width = max(len(label) for _, label, _ in _DIRECTION_LINES)
    lines = ["====== Direction statistics (docs/definitions.md) ======"]
    if not d.get("has_labels"):
        lines.append("Label-aware metrics (Δnll, flips, top 5, margins): n/a, no labels")
    for key, label, percent in _DIRECTION_LINES:
        if d.get(key) is None and d.get(f"n_{key}") is None:
            continue
        value = (f"{pm(_pct(g(key)), _pct(g(key + '_se')), 3, 6)} %" if percent
                 else pm(g(key), g(key + "_se")))
        counted = d.get(f"n_{key}")
        note = f"  ({counted} tokens)" if counted is not None and counted != d.get("n_valid") else ""
        lines.append(f"{label:<{width}}: {value}{note}")
    groups = [(f"p_base(top1) in [{b['lo']:g}, {b['hi']:g}{']' if b['hi'] == 1 else ')'}", b)
              for b in d.get("kld_by_conf") or ()]
    groups += [(label, d[key]) for key, label in (("kld_ref_right", "base top-1 = label"),
                                                  ("kld_ref_wrong", "base top-1 ≠ label"))
               if d.get(key) is not None]
    if groups:
        rows = [[label, str(b["n"]), num(_pct(b["token_share"]), 3), num(b["kld_mean"]),
                 num(_pct(b["kld_share"]), 3)] for label, b in groups]
        lines += ["", "KLD split by the base's top-1 probability and correctness:",
                  table(["tokens", "n", "tokens %", "mean KLD", "share of KLD %"], rows)]
    return "\n".join(lines)


def _getter(d: dict):
    def get(key):
        return _num(d.get(key))
    return get


# --- tables -----------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], fmt: str = "text",
          align: str | None = None) -> str:
    """A plain-text (columns padded, numbers right-aligned) or Markdown table. align: one
    'l' or 'r' per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if fmt == "markdown":
        sep = ["---" if a == "l" else "---:" for a in align]
        return "\n".join("| " + " | ".join(r) + " |" for r in [header, sep, *rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    out = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


COMPACT_COLUMNS = {  # --sort key -> (header, lower is better)
    "given": ("", True),
    "kld": ("mean KLD ± SE", True),
    "p99": ("p99 KLD", True),
    "p99.9": ("p99.9 KLD", True),
    "same_top": ("same top %", False),
    "ln_ppl_ratio": ("ln PPL ratio ± SE", True),
    "rms_dp": ("RMS Δp %", True),
    "flip_net": ("net flips %", True),   # these two need compare --direction
    "tvd": ("mean TVD", True),
}
DIRECTION_SORT_KEYS = ("flip_net", "tvd")


def compact_value(s: dict, key: str) -> float:
    """The number a compact-table column sorts by."""
    return {
        "kld": lambda: _num(s["kld"]["mean"]),
        "p99": lambda: _num(s["kld"]["percentiles"].get("99")),
        "p99.9": lambda: _num(s["kld"]["percentiles"].get("99.9")),
        "same_top": lambda: _num(s.get("same_top")),
        "ln_ppl_ratio": lambda: _num(s.get("ln_ppl_ratio")),
        "rms_dp": lambda: _num(s.get("rms_delta_p")),
        "flip_net": lambda: _num((s.get("direction") or {}).get("flip_net")),
        "tvd": lambda: _num((s.get("direction") or {}).get("tvd_mean")),
    }[key]()


def compact_table(names: list[str], summaries: list[dict], *, sort: str = "given",
                  paired: dict | None = None, baseline: str | None = None,
                  fmt: str = "text") -> str:
    """One row per model: mean KLD ± SE, p99 and p99.9 KLD, same top, ln PPL ratio ± SE,
    RMS Δp, with the direction metrics (compare --direction) the net flip rate and mean TVD,
    and with `paired` ({name: PairedComparison against the baseline}) the paired
    difference of mean KLD against `baseline` with its 95% bootstrap CI. Rows as given, or
    sorted best first by the `sort` column."""
    order = list(range(len(names)))
    if sort != "given":
        lower_better = COMPACT_COLUMNS[sort][1]
        key = [compact_value(s, sort) for s in summaries]
        order.sort(key=lambda i: (math.isnan(key[i]), key[i] if lower_better else -key[i]))
    header = ["model", "mean KLD ± SE", "p99 KLD", "p99.9 KLD", "same top %",
              "ln PPL ratio ± SE", "RMS Δp %"]
    direction = any(s.get("direction") for s in summaries)
    if direction:
        header += ["net flips %", "mean TVD"]
    if paired is not None:
        header.append(f"Δ mean KLD vs {baseline} [95% CI]")
    rows = []
    for i in order:
        s = summaries[i]
        kp = s["kld"]["percentiles"]
        row = [names[i], pm(s["kld"]["mean"], s["kld"]["se"], width=0),
               num(kp.get("99")), num(kp.get("99.9")),
               pm(_pct(s.get("same_top")), _pct(s.get("same_top_se")), 3, 0),
               pm(s.get("ln_ppl_ratio"), s.get("ln_ppl_ratio_se"), width=0)
               if s.get("has_labels") else "n/a",
               num(_pct(s.get("rms_delta_p")), 3) if s.get("has_labels") else "n/a"]
        if direction:
            d = s.get("direction") or {}
            row += [num(_pct(d["flip_net"]), 3) if d.get("n_flip_net") is not None else "n/a",
                    num(d.get("tvd_mean")) if d.get("n_tvd_mean") is not None else "n/a"]
        if paired is not None:
            pc = paired.get(names[i])
            d = pc.get("kld") if pc is not None else None
            row.append("(baseline)" if names[i] == baseline else
                       "n/a" if d is None else
                       f"{_signed(d.diff, d)} [{_signed(d.ci_low, d)}, {_signed(d.ci_high, d)}]")
        rows.append(row)
    return table(header, rows, fmt)


def _signed(x: float, d) -> str:
    dec = max(decimals(d.diff), decimals(d.se), decimals(d.ci_low), decimals(d.ci_high))
    return f"{x:+.{dec}f}"


# --- paired comparison -------------------------------------------------------------------

# quantity -> (label, scale for display, unit, sentence for "A is better")
_PAIRED_LABELS = {
    "kld": ("mean KLD", 1.0, "", "{} has the lower mean KLD (is closer to the reference) than {}"),
    "same_top": ("same top %", 100.0, " points",
                 "{} agrees with the reference's top token more often than {}"),
    "ln_ppl_ratio": ("ln PPL ratio", 1.0, "", "{} has the lower perplexity than {}"),
}
_BETTER_IS_LOWER = {"kld": True, "same_top": False, "ln_ppl_ratio": True}


def format_paired(pc, fmt: str = "text") -> str:
    """A table of A - B per quantity (paired SE, bootstrap CI), then one plain sentence per
    quantity saying whether the data can tell the two models apart."""
    level = round(100 * pc.differences[0].confidence) if pc.differences else 95
    header = ["quantity", pc.name_a, pc.name_b, f"{pc.name_a} − {pc.name_b} ± paired SE",
              f"{level}% CI (paired bootstrap)", "tokens"]
    rows, sentences = [], []
    for d in pc.differences:
        label, scale, unit, better = _PAIRED_LABELS[d.quantity]
        low = 3 if scale == 100 else 6
        dec = max(decimals(scale * x, low) for x in (d.diff, d.se, d.ci_low, d.ci_high))
        f = lambda x: f"{scale * x:+.{dec}f}"  # noqa: E731
        rows.append([label, num(scale * d.mean_a, low), num(scale * d.mean_b, low),
                     f"{f(d.diff)} ± {scale * d.se:.{dec}f}", f"[{f(d.ci_low)}, {f(d.ci_high)}]",
                     str(d.n_tokens)])
        sentences.append(_verdict(pc, d, label, better, f, unit))
    title = f"Paired comparison on the same tokens: {pc.name_a} vs {pc.name_b}"
    body = table(header, rows, fmt)
    if fmt == "markdown":
        return f"**{title}**\n\n{body}\n\n" + "\n".join(f"- {s}" for s in sentences)
    return f"{title}\n{body}\n" + "\n".join(sentences)


def _verdict(pc, d, label, better, f, unit) -> str:
    ci = f"{round(100 * d.confidence)}% CI [{f(d.ci_low)}, {f(d.ci_high)}]{unit}"
    if not math.isfinite(d.ci_low) or not math.isfinite(d.ci_high):
        return f"{label}: too few tokens to compare {pc.name_a} and {pc.name_b}."
    if not d.distinguishable:
        return (f"{label}: the data cannot tell {pc.name_a} and {pc.name_b} apart "
                f"(difference {f(d.diff)}{unit}, {ci} contains 0).")
    a_better = (d.diff < 0) == _BETTER_IS_LOWER[d.quantity]
    names = (pc.name_a, pc.name_b) if a_better else (pc.name_b, pc.name_a)
    return (f"{label}: {better.format(*names)} (difference {f(d.diff)}{unit}, {ci} excludes 0).")


# --- most divergent tokens ----------------------------------------------------------------


def format_top_tokens(name: str, rows: list[dict], fmt: str = "text", *, title: str = "") -> str:
    """rows: dicts from commands' top-token listing: rank, token, prompt, position, kld,
    label, top1_ref, top1_q, p_ref_y, p_q_y and, with a tokenizer, text columns."""
    has_text = any("context" in r for r in rows)
    by_prompt = any("prompt_kld" in r for r in rows)
    header = ["rank", "token", "prompt", "pos", "KLD", "label", "p_ref(y)", "p_q(y)",
              "top ref", "top q"]
    if by_prompt:
        header.insert(3, "prompt mean KLD")
    if has_text:
        header.append("context ⟨label⟩")
    out_rows = []
    for r in rows:
        row = [str(r["rank"]), str(r["token"]), str(r["prompt"]), str(r["position"]),
               num(r["kld"]), _tok(r, "label"), num(r["p_ref_y"], 3), num(r["p_q_y"], 3),
               _tok(r, "top1_ref"), _tok(r, "top1_q")]
        if by_prompt:
            row.insert(3, num(r["prompt_kld"]))
        if has_text:
            row.append(r.get("context", ""))
        out_rows.append(row)
    align = "r" * (len(header) - has_text) + ("l" if has_text else "")
    head = title or f"Most divergent tokens: {name}"
    body = table(header, out_rows, fmt, align=align)
    return f"**{head}**\n\n{body}" if fmt == "markdown" else f"{head}\n{body}"


def _tok(r: dict, key: str) -> str:
    tid = r.get(key)
    if tid is None or tid < 0:
        return "-"
    text = r.get(f"{key}_text")
    return f"{tid} {text}" if text is not None else str(tid)


# --- running lines ----------------------------------------------------------------------

RUNNING_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          "
                  "KL Divergence              Δp RMS            Same top p")


def format_running_line(line) -> str:
    """One llama.cpp per-chunk line, in its column widths (`%4d%13.4f ± %9.4f%14.5f ± %10.5f
    %14.5f ± %10.5f%10.3f ± %6.3f %%%10.3f ± %6.3f %%`), with more decimals where three
    significant digits need them."""
    return (f"{line.prompt:4d}{pm(line.ppl_q, line.ppl_q_se, 4, 13, se_width=9)}"
            f"{pm(line.ln_ppl_ratio, line.ln_ppl_ratio_se, 5, 14, se_width=10)}"
            f"{pm(line.kld, line.kld_se, 5, 14, se_width=10)}"
            f"{pm(_pct(line.rms_delta_p), _pct(line.rms_delta_p_se), 3, 10, se_width=6)} %"
            f"{pm(_pct(line.same_top), _pct(line.same_top_se), 3, 10, se_width=6)} %")


def format_running(lines) -> str:
    """llama.cpp's layout: the header, then each chunk's line, a blank line between chunks."""
    return "\n\n".join(f"{RUNNING_HEADER}\n{format_running_line(x)}" for x in lines)
