"""The doctor's HTML page: findings first, then plots of what the monitors and tests measured
(loss, gradient norms, update/weight ratios, activation statistics, the one-batch overfit and the
LR range test). One self-contained file: the plots are inline PNGs, nothing loads from a CDN."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from matplotlib.figure import Figure

from cifarlab.doctor.findings import Report

__all__ = ["render_html"]

_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:62rem;padding:0 1rem}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4rem;
text-align:left;vertical-align:top}.critical,.error{color:#b00020;font-weight:600}
.warning{color:#a05a00;font-weight:600}.info{color:#555}img{max-width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(28rem,1fr));gap:1rem}"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: Report) -> list[tuple[str, str]]:
    out = []
    mon = report.series.get("monitor") or {}
    steps = mon.get("step") or []

    def figure(title: str) -> tuple[Any, Any]:
        fig = Figure(figsize=(6, 3.2))  # no pyplot: nothing global, no backend to switch
        ax = fig.subplots()
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return fig, ax

    if steps:
        fig, ax = figure("Training loss (sampled steps)")
        ax.plot(steps, mon["loss"], marker=".")
        ax.set_xlabel("step")
        out.append(("loss", _png(fig)))
        fig, ax = figure("Gradient norm (weights)")
        ax.semilogy(steps, [max(v, 1e-12) for v in mon["grad_norm"]], marker=".")
        ax.set_xlabel("step")
        out.append(("grad_norm", _png(fig)))
        for key, title, log in (("update_ratio", "Update / weight ratio per layer", True),
                                ("active_fraction",
                                 "Fraction of channels active at least once per batch", False)):
            names = sorted({k for row in mon[key] for k in row})
            if not names:
                continue
            fig, ax = figure(title)
            for name in names:
                pts = [(st, r[name]) for st, r in zip(steps, mon[key], strict=False)
                       if name in r and (r[name] > 0 or not log)]
                if pts:
                    (ax.semilogy if log else ax.plot)(*zip(*pts, strict=True), label=name, lw=1)
            if log:
                for y in (1e-4, 1e-2):
                    ax.axhline(y, color="k", ls="--", lw=0.8)
            else:
                ax.set_ylim(0, 1.05)
            ax.set_xlabel("step")
            if len(names) <= 12:
                ax.legend(fontsize=7)
            out.append((key, _png(fig)))
        curve = report.series.get("overfit_one_batch")
    if curve and curve.get("loss"):
        fig, ax = figure("Overfitting one batch of 32 (plain cross-entropy)")
        ax.semilogy(curve["step"], [max(v, 1e-8) for v in curve["loss"]])
        ax.set_xlabel("step")
        out.append(("overfit", _png(fig)))
    lr = report.series.get("lr_range")
    if lr and lr.get("lr_scale"):
        fig, ax = figure("LR range test (multiplier of the configured lr)")
        ax.semilogx(lr["lr_scale"], lr["loss"])
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("lr multiplier")
        ax.set_ylabel("smoothed loss")
        out.append(("lr_range", _png(fig)))
    return out


def render_html(report: Report, title: str = "cifarlab doctor") -> str:
    rows = []
    for f in report.ranked():
        d = f.to_dict()
        rows.append(
            f"<tr><td class='{d['severity']}'>{d['severity']}</td><td><b>"
            f"{html.escape(d['title'])}</b><br><code>{d['rule']}</code></td><td>"
            f"{html.escape(d['message'])}</td><td>{html.escape(d['cause'])}<br><i>Fix:</i> "
            f"{html.escape(d['fix'])}<br><small>{html.escape(d['source'])}</small></td></tr>")
    n_alarm = len(report.alarms())
    verdict = ("No warnings or errors." if not n_alarm
               else f"{n_alarm} finding(s) need attention.")
    plots = "".join(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'></figure>"
                    for name, data in _plots(report))
    checks = ", ".join(f"<code>{c}</code>" for c in report.checks_run)
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><h1>{html.escape(title)}</h1><p>{verdict}</p>"
            "<table><tr><th>severity</th><th>finding</th><th>evidence</th><th>cause, fix, "
            f"source</th></tr>{''.join(rows)}</table><h2>Measurements</h2><div class='grid'>"
            f"{plots}</div><h2>Checks run</h2><p>{checks}</p></html>")
