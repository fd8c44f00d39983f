"""The run's evaluation report as one self-contained HTML page (``eval/report.html``).

Plots are inline SVG from matplotlib's SVG backend, styles inline: the page opens from a
file, an object store or an Airflow link without any network. It shows this run's holdout metrics
against popularity, the last runs of the quality history (``recsys_runs``) in date order with each run's
gate and outcome, how recommendations spread over the catalogue (coverage, popularity bias, categories),
the extract's data-quality counts and the training time and data size over time; and, when an
experiment was running, its analysis as the run's ``analyse_experiment`` task acted on it
(:func:`experiment_section`, also the page ``recsys experiments report NAME --html`` writes).
"""

from __future__ import annotations

import html
import io
import math
from datetime import date, datetime, timedelta

import matplotlib

matplotlib.use("svg")  # static SVG, no display, no GUI toolkit

import matplotlib.dates as mdates  # noqa: E402 - after the backend is chosen
import matplotlib.pyplot as plt  # noqa: E402

METRICS = (("map", "MAP"), ("ndcg", "nDCG"), ("precision", "precision"), ("recall", "recall"))
MODEL_COLOUR, POPULARITY_COLOUR, GATE_COLOUR = "#1f77b4", "#999999", "#d62728"


def _svg(figure) -> str:
    buffer = io.StringIO()
    # "tight" crops to what is drawn, legends placed below an axes included (tight_layout would
    # warn about long category names instead)
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def metrics_plot(report: dict) -> str:
    k = report["k"]
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    positions = range(len(METRICS))
    for offset, (name, colour) in ((-0.2, ("model", MODEL_COLOUR)), (0.2, ("popularity", POPULARITY_COLOUR))):
        values = [report[name][key] for key, _ in METRICS]
        bars = axes.bar([p + offset for p in positions], values, width=0.4, color=colour, label=name)
        axes.bar_label(bars, fmt="%.3f", fontsize=8)
    axes.set_xticks(list(positions), [f"{label}@{k}" for _, label in METRICS])
    axes.set_title(f"This run on the holdout: model vs popularity (K={k})")
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure)


def _times(history: list[dict]) -> list[datetime]:
    return [row["window_end"] for row in history]


def in_date_order(history: list[dict]) -> list[dict]:
    """History rows by window end, then recording time: a backfill recorded after later dates
    still sits at its own date (plots joined in recording order would zig-zag)."""
    return sorted(history, key=lambda row: (row["window_end"], row["recorded_at"]))


# how each recsys_runs status is drawn on the model's line: (label, marker, face colour)
OUTCOME_MARKERS = {
    "published": ("published", "o", MODEL_COLOUR),
    "refused": ("refused by the gate", "X", GATE_COLOUR),
    "skipped_stale": ("not published: live data newer", "o", "white"),
    "evaluated": ("evaluated (this run, or not published yet)", "D", "white"),
    "failed": ("publish failed", "s", GATE_COLOUR),
}


def run_gate(row: dict) -> float:
    """The MAP@K this run's own gate asked for: its popularity MAP x (1 + its min_lift)."""
    return row["metrics"]["popularity"]["map"] * (1 + (row.get("params") or {}).get("min_lift", 0.0))


def _date_axis(axes, times: list[datetime]) -> None:
    if len(set(times)) < 2:
        # one date: matplotlib would spread its default ticks over years; a day either side instead
        axes.set_xlim(times[0] - timedelta(days=1), times[0] + timedelta(days=1))
    locator = mdates.AutoDateLocator(maxticks=8)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def history_plot(history: list[dict]) -> str:
    """MAP@K of model and popularity over the last runs in date order, each run's own gate, and
    what became of each run (published, refused, skipped...) as the marker on the model's line."""
    history = in_date_order(history)
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    times = _times(history)
    model = [row["metrics"]["model"]["map"] for row in history]
    popularity = [row["metrics"]["popularity"]["map"] for row in history]
    axes.plot(times, model, "-", color=MODEL_COLOUR, label="model MAP@K")
    axes.plot(times, popularity, "s--", color=POPULARITY_COLOUR, markersize=4, label="popularity MAP@K")
    axes.plot(times, [run_gate(row) for row in history], ":", color=GATE_COLOUR,
              label="gate of each run: popularity x (1 + min_lift)")
    for status, (label, marker, face) in OUTCOME_MARKERS.items():
        points = [(t, m) for t, m, row in zip(times, model, history, strict=True) if row["status"] == status]
        if points:
            axes.scatter(*zip(*points, strict=True), marker=marker, s=50, facecolors=face, zorder=3, label=label,
                         edgecolors=GATE_COLOUR if status in ("refused", "failed") else MODEL_COLOUR)
    axes.set_title(f"Quality history: the last {len(history)} runs (by window end)")
    axes.spines[["top", "right"]].set_visible(False)
    _date_axis(axes, times)
    # below the axes: inside, the eight entries would cover runs
    axes.legend(frameon=False, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return _svg(figure)


def popularity_bias_plot(distribution: dict) -> str:
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    for name, colour in (("model", MODEL_COLOUR), ("popularity", POPULARITY_COLOUR)):
        curve = distribution[name]["top_popular_share"]
        axes.plot([float(x) for x in curve], list(curve.values()), "o-", color=colour, label=name)
    axes.plot([0, 100], [0, 1], ":", color="#555555", label="no bias")
    axes.set_xscale("symlog", linthresh=1)
    axes.set_xticks([1, 2, 5, 10, 20, 50, 100], ["1", "2", "5", "10", "20", "50", "100"])
    axes.set_xlabel("top x % most popular products")
    axes.set_ylabel("share of recommendations")
    axes.set_title("Popularity bias")
    axes.legend(frameon=False, fontsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure)


def category_plot(distribution: dict) -> str:
    shares = distribution["model"]["category_share"]
    figure, axes = plt.subplots(figsize=(6.4, 0.6 + 0.28 * max(1, len(shares))))
    names = list(shares)[::-1]
    axes.barh(names, [shares[name] for name in names], color=MODEL_COLOUR)
    axes.set_xlabel("share of the model's recommendations")
    axes.set_title("Recommendations by category (model)")
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure)


def data_quality_plot(history: list[dict]) -> str:
    """Rows the extract read and kept (left axis), rows it dropped by reason (right axis), per run."""
    figure, rows_axis = plt.subplots(figsize=(6.4, 3.2))
    rows = [row for row in in_date_order(history) if row.get("extract_counts")]
    times = _times(rows)
    for name, style in (("rows_read", "k.-"), ("rows_kept", "o-")):
        rows_axis.plot(times, [row["extract_counts"][name] for row in rows], style, label=name.replace("_", " "))
    rows_axis.set_ylim(bottom=0)
    rows_axis.set_ylabel("rows")
    dropped_axis = rows_axis.twinx()
    reasons = sorted({reason for row in rows for reason in row["extract_counts"].get("dropped", {})})
    for reason in reasons:
        counts = [row["extract_counts"]["dropped"].get(reason, 0) for row in rows]
        dropped_axis.plot(times, counts, "x--", label=f"dropped: {reason}")
    dropped_axis.set_ylim(bottom=0, top=max(1, dropped_axis.get_ylim()[1]))
    dropped_axis.set_ylabel("rows dropped")
    rows_axis.set_title("Extract data quality" + ("" if reasons else ": no rows dropped"))
    _legend_below(rows_axis, dropped_axis)
    _date_axis(rows_axis, times)
    return _svg(figure)


def _legend_below(*axes_list) -> None:
    handles, labels = [], []
    for axes in axes_list:
        more = axes.get_legend_handles_labels()
        handles += more[0]
        labels += more[1]
    axes_list[0].legend(handles, labels, frameon=False, fontsize=8, ncol=4, loc="upper center",
                        bbox_to_anchor=(0.5, -0.15))


def size_plot(history: list[dict]) -> str:
    """Training time (left axis) and data size (right axis) per run."""
    history = in_date_order(history)
    figure, seconds_axis = plt.subplots(figsize=(6.4, 3.2))
    times = _times(history)
    seconds_axis.plot(times, [row["train_seconds"] for row in history], "o-", color=GATE_COLOUR,
                      label="training seconds")
    seconds_axis.set_ylim(bottom=0)
    seconds_axis.set_ylabel("training (s)")
    size_axis = seconds_axis.twinx()
    for name, style in (("interactions", "s--"), ("users", "^--"), ("items", "v--")):
        size_axis.plot(times, [row[name] for row in history], style, label=name)
    size_axis.set_yscale("log")
    size_axis.set_ylabel("rows (log)")
    seconds_axis.set_title("Training time and data size")
    _legend_below(seconds_axis, size_axis)
    _date_axis(seconds_axis, times)
    return _svg(figure)


RATE_LABELS = {"click_through": "click-through", "conversion": "conversion"}


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def experiment_rates_plot(result: dict, metric: str) -> str:
    """Per variant and UTC day, ``metric`` (lists followed / lists served) with its 95 % interval
    as a band."""
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    for variant in result["variants"]:
        days = [date.fromisoformat(day["day"]) for day in variant["days"]]
        values = [_number(day[metric]["value"]) for day in variant["days"]]
        line = axes.plot(days, values, "o-", markersize=4, label=variant["name"])[0]
        axes.fill_between(days, [_number(day[metric]["low"]) for day in variant["days"]],
                          [_number(day[metric]["high"]) for day in variant["days"]],
                          color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_title(f"{RATE_LABELS[metric]} per day and variant (95 % interval)")
    axes.set_ylim(bottom=0)
    axes.spines[["top", "right"]].set_visible(False)
    span = len({day["day"] for variant in result["variants"] for day in variant["days"]})
    # whole days only (the automatic locator puts ticks at noon on a few days)
    axes.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, math.ceil(span / 8))))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))
    axes.legend(frameon=False, fontsize=8)
    return _svg(figure)


def experiment_lift_plot(result: dict) -> str:
    """Each treatment's relative lift over the control, per metric, with its 95 % interval
    (forest plot), and each guardrail's allowed drop."""
    treatments = [variant for variant in result["variants"] if variant["lift"] is not None]
    rows = [(variant, metric) for variant in treatments for metric in RATE_LABELS]
    figure, axes = plt.subplots(figsize=(6.4, 0.9 + 0.45 * len(rows)))
    for position, (variant, metric) in enumerate(rows):
        lift = variant["lift"][metric]
        if lift["value"] is None:
            continue
        low, high = _number(lift["low"]), _number(lift["high"])
        colour = GATE_COLOUR if lift["significant"] and lift["value"] < 0 else MODEL_COLOUR
        axes.errorbar([lift["value"]], [position], xerr=[[lift["value"] - low], [high - lift["value"]]], fmt="o",
                      color=colour, capsize=4)
    for guardrail in result["guardrails"]:
        axes.axvline(-guardrail["max_drop"], color=GATE_COLOUR, linestyle=":", linewidth=1)
    axes.axvline(0, color="#555555", linewidth=1)
    axes.set_yticks(range(len(rows)), [f"{variant['name']}: {RATE_LABELS[metric]}" for variant, metric in rows])
    axes.set_ylim(len(rows) - 0.5, -0.5)
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:+.0%}")
    axes.set_title("Lift over the control (95 % interval)")
    axes.set_xlabel("relative lift; red dotted: a guardrail's allowed drop")
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure)


def estimate_text(estimate: dict) -> str:
    """A rate with its 95 % interval, as the report and `recsys experiments report` show it."""
    if estimate["value"] is None:
        return "–"
    if estimate["low"] is None:
        return f"{estimate['value']:.4f}"
    return f"{estimate['value']:.4f} [{estimate['low']:.4f}, {estimate['high']:.4f}]"


def lift_text(lift: dict | None) -> str:
    """A lift over the control with its interval (``None``: the control itself)."""
    if lift is None:
        return "control"
    if lift["value"] is None:
        return "–"
    return (f"{lift['value']:+.1%} [{lift['low']:+.1%}, {lift['high']:+.1%}]"
            + (" (significant)" if lift["significant"] else ""))


def experiment_section(result: dict) -> str:
    """The experiment's part of a page: per variant table, the two plots, the sample-ratio check
    and the guardrails' decisions. ``result`` is ``recsys experiments report --json``'s object."""
    name = html.escape(result["experiment"])
    rows = "".join(
        f"<tr><th>{html.escape(variant['name'])}</th><td>{variant['share']:.0%}</td>"
        f"<td>{'stopped ' + html.escape(variant['stopped_at']) if variant['stopped_at'] else 'serving'}</td>"
        f"<td>{variant['exposed_users']:,}</td><td>{variant['lists']:,}</td>"
        + "".join(f"<td>{estimate_text(variant[metric])}</td><td>{lift_text((variant['lift'] or {}).get(metric) if variant['lift'] else None)}</td>"
                  for metric in RATE_LABELS)
        + "</tr>"
        for variant in result["variants"]
    )
    head = "".join(f"<th>{label} [95 %]</th><th>lift</th>" for label in RATE_LABELS.values())
    srm = result["srm"]
    srm_text = (f"Sample ratio: p = {srm['p_value']:.3g} "
                + ("<strong class=\"alarm\">mismatch</strong>: the users per variant are not the configured split "
                   "(exposures logged under wrong variants, or lost for some); the results cannot be trusted"
                   if srm["alarm"] else "(as configured)")
                + f"; users counted {', '.join(f'{html.escape(k)} {v:,}' for k, v in srm['observed'].items())}.")
    checks = "".join(
        f"<li>{html.escape(check['variant'])}, {RATE_LABELS[check['metric']]} (allowed drop {check['max_drop']:.0%}): "
        f"<strong>{html.escape(check['decision'])}</strong>, lift {lift_text(check['lift'])}</li>"
        for check in result["guardrails"]
    )
    decisions = "".join(
        f"<li>{html.escape(str(row['decided_at']))}: {html.escape(row['variant'])} stopped: {html.escape(row['reason'])}</li>"
        for row in result.get("decisions", [])
    )
    cards = [experiment_rates_plot(result, metric) for metric in RATE_LABELS]
    if any(variant["lift"] is not None for variant in result["variants"]):
        cards.append(experiment_lift_plot(result))
    return f"""<section id="experiment"><h2>Experiment {name}: {html.escape(result['status'])}</h2>
<p class="sub">analysed until {html.escape(result['analysed_until'])}; primary metric
{RATE_LABELS[result['primary_metric']]}; outcomes within {result['attribution_hours']:g} h of serving;
rates are lists followed / lists served with 95 % intervals (per-user delta method)</p>
<table><tr><th>variant</th><th>share</th><th>status</th><th>exposed users</th><th>lists</th>{head}</tr>{rows}</table>
<p>{srm_text}</p>
<p>Guardrails:</p><ul>{checks or '<li>none</li>'}</ul>
{f'<p>Stops recorded:</p><ul>{decisions}</ul>' if decisions else ''}
<div class="grid">{''.join(f'<div class="card">{card}</div>' for card in cards)}</div>
</section>"""


def experiment_page(result: dict) -> str:
    """``recsys experiments report NAME --html``: the experiment's section as a page of its own."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recsys experiment {html.escape(result['experiment'])}</title>
<style>{STYLE}</style></head><body>
{experiment_section(result)}
</body></html>
"""


def _table(report: dict) -> str:
    k = report["k"]
    head = "".join(f"<th>{label}@{k}</th>" for _, label in METRICS) + "<th>coverage</th>"
    body = "".join(
        f"<tr><th>{name}</th>"
        + "".join(f"<td>{report[name][key]:.4f}</td>" for key, _ in METRICS)
        + f"<td>{report[name]['coverage']:.1%}</td></tr>"
        for name in ("model", "popularity")
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def families_table(report: dict) -> str:
    """Every model family train chose among, with the validation metrics it was chosen on (none:
    ALS alone, nothing to choose)."""
    selection = report.get("selection")
    if not selection:
        return ""
    k, chosen = report["k"], selection["chosen"]["family"]
    head = "".join(f"<th>{label}@{k}</th>" for _, label in METRICS) + "<th>coverage</th><th class=\"text\">settings</th>"
    rows = []
    for name, row in selection["families"].items():
        validation = row["validation"]
        settings = ", ".join(f"{key}={value}" for key, value in row["params"].items() if key != "parts")
        if name == "blend":
            settings += " of " + " + ".join(part["family"] for part in row["params"]["parts"])
        rows.append(f"<tr><th>{html.escape(name)}{' (chosen)' if name == chosen else ''}</th>"
                    + "".join(f"<td>{validation[key]:.4f}</td>" for key, _ in METRICS)
                    + f"<td>{validation['coverage']:.1%}</td><td class=\"text\">{html.escape(settings)}</td></tr>")
    skipped = "".join(f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in selection["skipped"].items())
    return (f"<h2>Model families</h2><p class=\"note\">Chosen by validation {selection['objective'].upper()}@{k} on a "
            f"random quarter of each user's pre-holdout items (the holdout above judged only the chosen one).</p>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
            + (f"<p>Left out:</p><ul>{skipped}</ul>" if skipped else ""))


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px;margin:0 0 4px}.sub{color:#555;margin:0 0 16px}
.gate{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.passed{background:#e6f4ea;border:1px solid #34a853}.refused{background:#fce8e6;border:1px solid #d62728}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px}.card svg{width:100%;height:auto}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
.text{text-align:left}.note{color:#555;font-size:13px}.alarm{color:#d62728}h2{font-size:18px;margin:20px 0 4px}"""


def render(
    report: dict, history: list[dict], run_key: str, extract_counts: dict | None, experiment: dict | None = None
) -> str:
    """The page: ``report`` is the run's eval/report.json, ``history`` its recsys_runs rows
    oldest first (this run included), ``experiment`` the run's analysis of the running experiment."""
    gate = report["gate"]
    distribution = report["distribution"]
    window = report["window"]
    cards = [metrics_plot(report), popularity_bias_plot(distribution), category_plot(distribution)]
    if history:
        cards[1:1] = [history_plot(history)]
        if any(row.get("extract_counts") for row in history):
            cards.append(data_quality_plot(history))
        if all(row.get("train_seconds") is not None and row.get("interactions") for row in history):
            cards.append(size_plot(history))
    dropped = ""
    if extract_counts:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in extract_counts.get("dropped", {}).items())
        dropped = (f"<p>Extract: {extract_counts['rows_read']:,} rows read, {extract_counts['rows_kept']:,} kept"
                   + (f"; dropped {reasons}" if reasons else "") + ".</p>")
    diversity = distribution["model"]["mean_distinct_categories"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recsys run {html.escape(run_key)}</title>
<style>{STYLE}</style></head><body>
<h1>recsys evaluation: {html.escape(run_key)}</h1>
<p class="sub">data window {html.escape(window['start'])} .. {html.escape(window['end'])};
holdout after {html.escape(report['holdout_cutoff'])}; {report['model']['users']:,} holdout users</p>
<div class="gate {'passed' if gate['passed'] else 'refused'}">quality gate {html.escape(gate['reason'])}</div>
{_table(report)}
{families_table(report)}
<p>Catalogue coverage in the top {report['k']}: model {report['model']['coverage']:.1%},
popularity {report['popularity']['coverage']:.1%}. Mean distinct categories in one user's list:
model {diversity:.2f}, popularity {distribution['popularity']['mean_distinct_categories']:.2f}.</p>
{dropped}
<div class="grid">{''.join(f'<div class="card">{card}</div>' for card in cards)}</div>
<p class="note">When the gate refuses, nothing is published and the live version stays. Look at the history
plot: a one-off dip next to a normal popularity line is usually data (see the extract counts); a steady
slide needs new parameters (<code>recsys tune</code> or the recsys_tune DAG).</p>
{'' if experiment is None else experiment_section(experiment)}
</body></html>
"""
