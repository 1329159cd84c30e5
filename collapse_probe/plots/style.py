"""The figures' shared look: the Okabe-Ito palette (colour-blind safe), one colour per control role and per format
state, and a paper-sized rc style (7 pt text, no top/right spines, fonts embedded in PDF/SVG)."""
from __future__ import annotations

from collapse_probe import schema

OKABE_ITO = {"orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000"}
ROLE_COLOURS = {"end_of_turn": OKABE_ITO["vermillion"], "json_open": OKABE_ITO["green"],
                "tool_open": OKABE_ITO["blue"], "tool_close": OKABE_ITO["orange"], "json_close": OKABE_ITO["sky"],
                "eos": OKABE_ITO["purple"]}
_S = schema.FormatState
STATE_COLOURS = {_S.HEALTHY_TOOL_CALL.value: OKABE_ITO["green"], _S.HEALTHY_RESPONSE.value: OKABE_ITO["sky"],
                 _S.TEXT_POLLUTION.value: OKABE_ITO["orange"], _S.FULL_COLLAPSE.value: OKABE_ITO["vermillion"]}
STATE_LABELS = {_S.HEALTHY_TOOL_CALL.value: "healthy call", _S.HEALTHY_RESPONSE.value: "healthy reply",
                _S.TEXT_POLLUTION.value: "text pollution", _S.FULL_COLLAPSE.value: "full collapse"}
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
         "xtick.major.size": 2.5, "ytick.major.size": 2.5, "ytick.minor.size": 1.5, "lines.linewidth": 1.1,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
         "pdf.fonttype": 42, "svg.fonttype": "none", "font.family": "DejaVu Sans",
         "svg.hashsalt": "collapse-probe"}  # fixed ids: a figure redrawn from the same run is byte-identical
P_FLOOR = 1e-4  # probabilities are drawn on a log axis: below this they sit on the floor


def reproducible(fmt: str) -> dict | None:
    """savefig metadata without the creation date, so a figure redrawn from the same run is byte-identical
    (a committed report does not change when regenerated); `fmt` is "pdf", "svg" or "png"."""
    return {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt.lstrip(".").lower())
