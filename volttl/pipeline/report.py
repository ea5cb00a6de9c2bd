"""The report step: a pipeline's results (the search table, an evaluation, SVCCA, the
Grad-CAM overlays) and every step's outcome, as report.md in its work folder."""

from __future__ import annotations

from pathlib import Path

from volttl.outputs.folders import PipelineDir


def report_step(work: Path, report: dict) -> Path:
    """Write ``report.md`` from what the steps before it put in ``report``; returns its path."""
    lines = [f"# {report['name']}", ""]
    if "table" in report:
        lines += ["## Results", "", report["table"].strip(), ""]
    if "compare" in report:
        c = report["compare"]
        lines += ["## Transfer comparison", "", c["table"].strip(), ""]
        if c.get("curve_png"):
            lines += [f"![test AUROC against training studies]({c['curve_png']})", ""]
    if "evaluate" in report:
        e = report["evaluate"]
        lines += [f"## Evaluation of {e['run']} ({e['split']} split)", "", e["table"], ""]
    if "svcca" in report:
        s = report["svcca"]
        lines += ["## SVCCA: feature reuse per cut point", "",
                  f"Run: `{s['run']}`. Suggested cut (first overlap with the random baseline): "
                  f"**{s['suggested_cut'] or 'none'}**.", "",
                  "| cut | mean SVCCA | random | overlap |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['cut']} | {c['mean']:.3f} | {c['random_mean']:.3f} | {c['overlap']:.2f} |"
                  for c in s["cuts"]]
        lines.append("")
    if "cam" in report:
        c = report["cam"]
        lines += ["## Grad-CAM", "", f"{c['overlays']} overlays of the {c['row']} model (`{c['run']}`) in "
                  f"`{c['out']}`."]
        if "localisation" in c:
            lines.append(c["localisation"] + ".")
        lines.append("")
    steps = report["steps"]
    lines += ["## Steps", "", "| step | outcome | seconds |", "| --- | --- | --- |"]
    one_line = lambda text: " ".join(text.split())  # noqa: E731  (a table cell holds one line)
    lines += [f"| {s['step']} | {one_line(s['outcome'])} | {s['seconds']} |" for s in steps]
    path = PipelineDir(work).report_md
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
