"""Self-contained HTML report: inline CSS, plots as inline base64 PNG, no external assets or links."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from resunet.evaluation.definitions import DEFINITIONS, TITLE as DEFINITIONS_TITLE
from resunet.evaluation.metrics import METRICS, SITUATIONS
from resunet.evaluation.runner import Evaluation

#: ``id`` of each section of the report, in order (tests check these).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("summary", "Summary per label"),
    ("plots", "Plots"),
    ("worst-cases", "Worst cases"),
    ("cases", "All cases"),
    ("definitions", DEFINITIONS_TITLE),
    ("provenance", "Provenance"),
)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.t,th.t{text-align:left}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;border-radius:4px}
.ok{background:#e7f5e9;border:1px solid #9bd3a4;padding:.6em 1em;border-radius:4px}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;word-break:break-all}
dl dt{font-weight:bold;margin-top:.5em}dl dd{margin-left:1.5em}
nav a{margin-right:1em}
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """Number for display: undefined (None) as an em dash, floats with ``digits`` significant digits."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return esc(v)


def _code(text: str) -> str:
    """Escape text and turn `backticks` into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(text))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: int = 1) -> str:
    h = "".join(f'<th class="t">{esc(c)}</th>' if i < text_cols else f"<th>{esc(c)}</th>" for i, c in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f'<td class="t">{c}</td>' if i < text_cols else f"<td>{c}</td>"
                                     for i, c in enumerate(r)) + "</tr>")  # fmt: skip
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def definitions_html() -> str:
    parts = []
    for section, items in DEFINITIONS:
        parts.append(f"<h3>{esc(section)}</h3><dl>")
        for term, text in items:
            parts.append(f"<dt>{esc(term)}</dt><dd>{_code(text)}</dd>")
        parts.append("</dl>")
    return "".join(parts)


def provenance_html(prov: Mapping[str, Any]) -> str:
    sw = prov.get("software") or {}
    model = prov.get("model")
    info = [
        ("run id", prov.get("run_id")),
        ("command", prov.get("command_line")),
        ("working directory", prov.get("cwd")),
        ("user", prov.get("user")),
        *([("web user", prov["web_user"])] if prov.get("web_user") else []),
        ("host", prov.get("host")),
        ("started (UTC)", prov.get("started_utc")),
        ("finished (UTC)", prov.get("finished_utc")),
    ]
    if model:
        info += [("model", model.get("name")), ("model file", model.get("path")), ("model SHA-256", model.get("sha256"))]
    else:
        info.append(("model", "not given (pass --predictions DIR/predictions.json to record it)"))
    out = [_table(["item", "value"], [[esc(k), f'<span class="mono">{esc(v)}</span>'] for k, v in info], 2)]
    out.append("<h3>Software</h3>")
    out.append(_table(["package", "version"], [[esc(k), esc(v)] for k, v in sw.items()], 2))
    out.append("<h3>Files (SHA-256)</h3>")
    frows = []
    for role, recs in (prov.get("files") or {}).items():
        for rec in recs:
            frows.append([esc(role), f'<span class="mono">{esc(rec.get("path"))}</span>',
                          f'<span class="mono">{esc(rec.get("sha256"))}</span>', fmt(rec.get("size_bytes"))])  # fmt: skip
    out.append(_table(["role", "path", "SHA-256", "bytes"], frows, 3))
    return "".join(out)


def build_html(
    evaluation: Evaluation,
    provenance: Mapping[str, Any],
    label_plots: Sequence[tuple[int, str]],
    worst: Sequence[tuple[str, str]],
    title: str = "resunet evaluation report",
) -> str:
    """The report as one HTML string.

    Args:
        evaluation: tables and case matching.
        provenance: dict from :func:`resunet.reports.provenance.collect_provenance`.
        label_plots: ``(label, base64 PNG)`` per label.
        worst: ``(caption, base64 PNG)`` per worst case.
        title: page title.
    """
    ev = evaluation
    names = ev.label_names
    s: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<nav>" + "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in SECTIONS) + "</nav>",
    ]
    # -- overview
    s.append(f'<section id="overview"><h2>{SECTIONS[0][1]}</h2>')
    model = (provenance.get("model") or {}).get("name") or "not recorded"
    s.append(
        f"<p>{len(ev.match.pairs)} {'case' if len(ev.match.pairs) == 1 else 'cases'} evaluated, labels {esc(', '.join(str(lab) for lab in ev.labels) or 'none')}, "
        f"NSD tolerance {ev.tolerance_mm:g} mm, model {esc(model)}, run {esc(provenance.get('run_id'))} "
        f"finished {esc(provenance.get('finished_utc'))}. Undefined values are shown as — (empty cells in CSV, "
        "null in JSON) and are never averaged; see the definitions below.</p>"
    )
    if ev.match.pred_only or ev.match.gt_only:
        s.append('<div class="warn" id="unmatched"><b>Cases not evaluated (no matching file):</b><ul>')
        if ev.match.gt_only:
            s.append(f"<li>{len(ev.match.gt_only)} reference(s) without a prediction: "
                     f"{esc(', '.join(ev.match.gt_only))}</li>")  # fmt: skip
        if ev.match.pred_only:
            s.append(f"<li>{len(ev.match.pred_only)} prediction(s) without a reference: "
                     f"{esc(', '.join(ev.match.pred_only))}</li>")  # fmt: skip
        s.append("</ul></div>")
    else:
        s.append('<div class="ok" id="unmatched">Every prediction had a reference and every reference a prediction.</div>')
    if provenance.get("input_warnings"):
        s.append('<div class="warn" id="input-warnings"><b>Cases whose input had problems when segmented</b> '
                 "(from predictions.json):<ul>")
        for case, msgs in sorted(provenance["input_warnings"].items()):
            s.append("".join(f"<li>{esc(case)}: {esc(m)}</li>" for m in msgs))
        s.append("</ul></div>")
    if ev.resampled:
        s.append(f'<div class="warn">Predictions resampled onto the reference grid (nearest neighbour): '
                 f"{esc(', '.join(ev.resampled))}</div>")  # fmt: skip
    s.append("</section>")
    # -- summary
    s.append(f'<section id="summary"><h2>{SECTIONS[1][1]}</h2>')
    for lab in ev.labels:
        lrows = [r for r in ev.summary if r["label"] == lab]
        if not lrows:
            continue
        c = lrows[0]
        s.append(f"<h3>label {lab}{esc(' (' + names[lab] + ')') if names.get(lab) else ''}</h3>")
        s.append("<p>" + ", ".join(f"{esc(sit.replace('_', ' '))}: {c['n_' + sit]}" for sit in SITUATIONS)
                 + f" (of {c['n_cases']} {'case' if c['n_cases'] == 1 else 'cases'})</p>")  # fmt: skip
        cols = ["metric", "n defined", "n undefined", "mean", "std", "median", "q1", "q3", "IQR", "95% CI of mean"]
        body = []
        for r in lrows:
            ci = "—" if r["ci95_low"] is None else f"{fmt(r['ci95_low'])} – {fmt(r['ci95_high'])}"
            body.append([esc(r["metric"]), fmt(r["n_defined"]), fmt(r["n_undefined"]), fmt(r["mean"]), fmt(r["std"]),
                         fmt(r["median"]), fmt(r["q1"]), fmt(r["q3"]), fmt(r["iqr"]), ci])  # fmt: skip
        s.append(_table(cols, body))
    s.append("</section>")
    # -- plots
    s.append(f'<section id="plots"><h2>{SECTIONS[2][1]}</h2>')
    s.append("<p>Per label: Dice and HD95 (box: quartiles, whiskers 1.5 IQR; dots: cases), predicted against "
             "reference volume, and the Bland-Altman plot of the volumes (bias and 95% limits of agreement).</p>")
    for lab, b64 in label_plots:
        s.append(f'<figure><img alt="plots for label {lab}" src="data:image/png;base64,{b64}"></figure>')
    s.append("</section>")
    # -- worst cases
    s.append(f'<section id="worst-cases"><h2>{SECTIONS[3][1]}</h2>')
    if worst:
        s.append("<p>Lowest Dice per label (ties: larger HD95). Green: reference; red: prediction (the reference "
                 "contour dashed on top). The slice crosses the axis with the largest voxel spacing where the two "
                 "masks disagree most.</p>")  # fmt: skip
        for caption, b64 in worst:
            s.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")  # fmt: skip
    else:
        s.append("<p>No case with the label present in either mask.</p>")
    s.append("</section>")
    # -- all cases
    s.append(f'<section id="cases"><h2>{SECTIONS[4][1]}</h2>')
    cols = ["case", "label", "situation", *METRICS]
    body = [[esc(r["case"]), fmt(r["label"]), esc(r["situation"]), *(fmt(r[m]) for m in METRICS)] for r in ev.rows]
    s.append(_table(cols, body, 3))
    s.append("</section>")
    # -- definitions and provenance
    s.append(f'<section id="definitions"><h2>{SECTIONS[5][1]}</h2>{definitions_html()}</section>')
    s.append(f'<section id="provenance"><h2>{SECTIONS[6][1]}</h2>{provenance_html(provenance)}</section>')
    s.append("</body></html>\n")
    return "\n".join(s)
