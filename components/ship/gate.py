"""The promotion gate: a new version takes `champion` only when it beats the current one on
every rule of `register.gate`, each compared number kept as a tag."""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.config import GateRule


@dataclass(frozen=True)
class Comparison:
    rule: GateRule
    new: float | None
    champion: float | None
    passed: bool

    def __str__(self) -> str:
        r = self.rule
        return (f"{r.metric} {fmt_num(self.new)} vs {fmt_num(self.champion)} ({r.direction}, "
                f"margin {r.min_margin:g}): {'pass' if self.passed else 'fail'}")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparisons: tuple[Comparison, ...] = ()


def fmt_num(v: float | None) -> str:
    return "missing" if v is None or math.isnan(v) else f"{v:.6g}"


def _missing(v: float | None) -> bool:
    return v is None or math.isnan(v)


def decide(rules: list[GateRule], new: dict[str, float],
           champion: dict[str, float] | None) -> Decision:
    """Promote when the new metrics beat the champion's on every rule: better by more than
    the rule's margin in its direction (a negative margin tolerates that much worse)."""
    comps = []
    for rule in rules:
        n, c = new.get(rule.metric), (champion or {}).get(rule.metric)
        ok = False
        if not _missing(n) and not _missing(c):
            gain = n - c if rule.direction == "max" else c - n
            ok = gain > rule.min_margin
        comps.append(Comparison(rule, n, c, ok))
    missing_new = [c.rule.metric for c in comps if _missing(c.new)]
    if missing_new:
        return Decision(False, f"no value for {', '.join(missing_new)}", tuple(comps))
    if champion is None:
        return Decision(True, "no champion yet", tuple(comps))
    missing_champ = [c.rule.metric for c in comps if _missing(c.champion)]
    if missing_champ:
        return Decision(False, f"the champion has no {', '.join(missing_champ)} (evaluated "
                        "before the gate used it): compare by hand, then `tinyldm promote "
                        "VERSION --force --reason ...`", tuple(comps))
    failed = [c for c in comps if not c.passed]
    if failed:
        return Decision(False, "; ".join(map(str, failed)), tuple(comps))
    return Decision(True, "; ".join(map(str, comps)), tuple(comps))


def gate_tags(decision: Decision, champion_version: str | None) -> dict[str, str]:
    """The decision and every compared number, as tags (on the version and its run)."""
    tags = {"gate.decision": "promoted" if decision.promote else "rejected",
            "gate.reason": decision.reason[:5000],
            "gate.champion_version": champion_version or ""}
    for c in decision.comparisons:
        k = f"gate.{c.rule.metric}"
        tags |= {f"{k}.new": fmt_num(c.new), f"{k}.champion": fmt_num(c.champion),
                 f"{k}.rule": f"{c.rule.direction} margin {c.rule.min_margin:g}",
                 f"{k}.passed": str(c.passed).lower()}
    return tags
