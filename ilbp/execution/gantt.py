"""Drawing a pipeline schedule: a simulated `Timeline` as a Gantt chart (PNG).

Stages are numbered 1..K and steps from 1, as the run's metrics name them (`head{k}/...`,
`stage{k}`).
"""

from __future__ import annotations

import pathlib

from ilbp.execution.schedule import Backward, Timeline, Update

# Bar colours by kind: forward blue, head orange, input gradient light green, weight dark green.
_COLOURS = {
  "F": "#4C72B0",
  "H": "#DD8452",
  "Bi": "#9BD39B",
  "Bw": "#2E7D32",
  "U": "#8172B3",
}
_LEGEND = {
  "F": "F forward",
  "H": "H head/loss",
  "Bi": "B input grad",
  "Bw": "B weight grad (hatched: + input)",
  "U": "U update",
}


def gantt(
  timeline: Timeline,
  path: str | pathlib.Path,
  title: str | None = None,
  unit: str = "units of one stage forward",
) -> pathlib.Path:
  """Draws a timeline as a PNG: one row per stage, bars coloured by op kind.

  Bars carry their microbatch number where it fits; every other step has a grey background and
  a dotted line marks the end of each step.

  Args:
    timeline: from `Schedule.simulate`.
    path: where to write the PNG.
    title: defaults to the timeline's description.
    unit: the time axis unit (that of the costs).

  Returns:
    The path written.
  """
  # The object-oriented API renders with Agg and never touches pyplot's global backend.
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  K, span = timeline.num_stages, max(timeline.makespan, 1e-9)
  height = 1.6 + 0.55 * K
  fig = Figure(figsize=(14, height), dpi=120)
  ax = fig.add_subplot()
  # A 6.5 pt digit is ~3.6 pt wide and the axes ~0.85 of 14 inches: about 240 digits per span.
  char_width = span / 240
  for slot in timeline.slots:
    op, width = slot.op, slot.end - slot.start
    if width <= 0:
      continue
    key = op.kind if not isinstance(op, Backward) else ("Bw" if op.backward.params else "Bi")
    merged = isinstance(op, Backward) and bool(op.backward.params and op.backward.passes)
    # Colour means op kind in every step; steps are told apart by the background bands below.
    y, alpha = K - 1 - op.stage, 1.0
    ax.barh(
      y,
      width,
      left=slot.start,
      height=0.8,
      color=_COLOURS[key],
      alpha=alpha,
      edgecolor="white",
      linewidth=0.5,
      hatch="///" if merged else None,
    )
    text = "U" if isinstance(op, Update) else str(op.microbatch)
    if width > char_width * (len(text) + 0.5):
      dark = key in ("F", "Bw", "U")
      ax.text(
        slot.start + width / 2,
        y,
        text,
        ha="center",
        va="center",
        fontsize=6.5,
        color="white" if dark else "black",
        # A patch behind the number keeps it legible on a hatched bar.
        bbox={"facecolor": _COLOURS[key], "edgecolor": "none", "pad": 0.3, "alpha": alpha}
        if merged
        else None,
      )
  for s in range(timeline.steps):
    end = timeline.step_end(s)
    if s % 2:
      ax.axvspan(timeline.step_end(s - 1), end, color="0.92", zorder=0)
    ax.axvline(end, color="black", linestyle=":", linewidth=1)
    ax.text(end, K - 0.45, f" end of step {s + 1}", fontsize=7, ha="right", va="bottom")
  ax.set_yticks(range(K), [f"stage {K - y}" for y in range(K)])
  ax.set_ylim(-0.6, K - 0.1)
  ax.set_xlim(0, span * 1.01)
  ax.set_xlabel(f"time ({unit}); dotted line: end of a step, odd steps on grey")
  ax.set_title(timeline.description if title is None else title)
  handles = [Patch(facecolor=_COLOURS[k], label=_LEGEND[k]) for k in _COLOURS]
  fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # keep ~0.35 inch free for the legend
  path = pathlib.Path(path)
  fig.savefig(path, format="png", bbox_inches="tight")
  return path
