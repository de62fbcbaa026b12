"""Routing rules: which model segments which series (DICOM node, PACS jobs, ``resunet predict --routes``).

A YAML file of rules, tried in order; the first whose every condition holds picks the model::

    rules:
      - name: head MR T1
        match:
          modality: MR                       # exact, case-insensitive (a list: any of them)
          body_part: "HEAD|BRAIN"            # regex on BodyPartExamined (search, case-insensitive)
          series_description: "t1|mprage"    # regex on SeriesDescription
          image_type: ORIGINAL               # every value listed must be in ImageType
          min_slices: 20                     # size: slices (instances) of the series
          max_slices: 1000
        model: brain_extraction              # a bundled model name or a checkpoint path
      - name: tissue of head MR T1 (a chain)
        match: {modality: MR, series_description: "t1"}
        model: [brain_extraction, brain_tissue]  # each later model inside the previous foreground
      - name: anything else
        match: {}
        skip: true                           # left alone (logged once per series)

A series no rule matches, or whose rule says ``skip``, is left alone and logged once. The rule that
matched is recorded with the job and in the audit log (``route`` in the case record). A bad file is
refused at start with the rule's position and the reason (:class:`~resunet.errors.ConfigError`).
Hand-written: a dozen lines of matching over header values; no rules library fits DICOM headers.
A list of models is a chain (:mod:`resunet.inference.chain`): the first segments the series, each
later one only inside the previous foreground (tissue classes of the extracted brain).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError

_KEYS = {"modality", "body_part", "series_description", "image_type", "min_slices", "max_slices"}


@dataclass(frozen=True)
class SeriesFacts:
    """What a rule looks at, from the series' headers."""

    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    n_slices: int = 0

    @classmethod
    def from_dataset(cls, ds: Any, n_slices: int) -> "SeriesFacts":
        it = ds.get("ImageType", ())
        values = (it,) if isinstance(it, str) else tuple(str(v) for v in it)
        return cls(str(ds.get("Modality", "") or ""), str(ds.get("BodyPartExamined", "") or ""),
                   str(ds.get("SeriesDescription", "") or ""), tuple(v.upper() for v in values), int(n_slices))


@dataclass(frozen=True)
class Rule:
    name: str
    model: str | None
    skip: bool = False
    modality: tuple[str, ...] = ()
    body_part: re.Pattern | None = None
    series_description: re.Pattern | None = None
    image_type: tuple[str, ...] = ()
    min_slices: int = 0
    max_slices: int | None = None
    then: tuple[str, ...] = ()  # a chain: models run after ``model``, each inside the previous foreground

    @property
    def models(self) -> tuple[str, ...]:
        """Every model of the rule, in order (empty for ``skip``)."""
        return () if self.model is None else (self.model, *self.then)

    def matches(self, s: SeriesFacts) -> bool:
        if self.modality and s.modality.upper() not in self.modality:
            return False
        if self.body_part is not None and not self.body_part.search(s.body_part):
            return False
        if self.series_description is not None and not self.series_description.search(s.series_description):
            return False
        if any(v not in s.image_type for v in self.image_type):
            return False
        return s.n_slices >= self.min_slices and (self.max_slices is None or s.n_slices <= self.max_slices)


@dataclass
class Routes:
    """The rules of one file, in order."""

    rules: list[Rule]
    source: str = ""
    _logged: set[str] = field(default_factory=set, repr=False)

    def route(self, s: SeriesFacts) -> Rule | None:
        """The first rule that matches ``s``; None when none does or the match says ``skip``."""
        for rule in self.rules:
            if rule.matches(s):
                return None if rule.skip else rule
        return None

    def log_unrouted(self, log: Any, key: str, s: SeriesFacts) -> None:
        """Log once per series key (a series UID or a case id) that no rule took it.

        Modality and size only: a SeriesDescription may hold the patient's name or other PHI.
        """
        if key not in self._logged:
            self._logged.add(key)
            log.info("routing (%s): no rule segments series %s (%s, %d slices); left alone",
                     self.source, key, s.modality or "?", s.n_slices)

    def check_models(self) -> None:
        """ConfigError when a rule names a model that is neither bundled nor a file (checked at start)."""
        from resunet.inference.bundled import resolve_model

        for rule in self.rules:
            for name in rule.models:
                if not resolve_model(name).is_file():
                    raise ConfigError(f"--routes {self.source}: rule '{rule.name}' names model {name!r}, "
                                      "which is neither a bundled model nor a file")


def route_cases(routes: Routes, cases: Sequence[Any], series_uid: str | None = None
                ) -> tuple[list[tuple[Rule, list[Any]]], dict[str, SeriesFacts | None]]:
    """Group ``resunet predict``'s cases by the rule that takes them (headers only, no pixels).

    A DICOM case's facts are those of the series the loader reads (``series_uid``, else the series
    with the most slices). Returns ``[(rule, cases)]`` in rule order (rules that take no case left
    out) and ``{case_id: facts}`` of the cases no rule takes (None: not DICOM, or no readable series).
    """
    import pydicom

    from resunet.errors import ResunetError
    from resunet.io.loader import list_series

    taken: dict[str, tuple[Rule, list[Any]]] = {}
    left: dict[str, SeriesFacts | None] = {}
    for case in cases:
        facts = None
        try:
            series = list_series(case.path)
        except ResunetError:
            series = []
        pick = [x for x in series if series_uid in (x.uid, x.series_instance_uid)] if series_uid else series[:1]
        if pick and pick[0].files:
            ds = pydicom.dcmread(sorted(pick[0].files)[0], stop_before_pixels=True)
            facts = SeriesFacts.from_dataset(ds, pick[0].n_slices)
        rule = routes.route(facts) if facts is not None else None
        if rule is None:
            left[case.case_id] = facts
        else:
            taken.setdefault(rule.name, (rule, []))[1].append(case)
    order = [r.name for r in routes.rules]
    return sorted(taken.values(), key=lambda rc: order.index(rc[0].name)), left


def _rule_lines(text: str) -> list[int]:
    """The line (1-based) where each item of ``rules:`` starts, from YAML's node marks ([] if unknown)."""
    import yaml

    try:
        node = yaml.compose(text)
        for key, value in node.value:
            if key.value == "rules" and isinstance(value, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in value.value]
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        pass
    return []


def load_routes(path: str | Path) -> Routes:
    """Read and check a rules file; ConfigError naming the rule and the reason."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except OSError as err:
        raise ConfigError(f"--routes {p}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--routes {p}: not valid YAML{where} ({getattr(err, 'problem', err)})") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("rules"), list) or not doc["rules"]:
        raise ConfigError(f"--routes {p}: expected a mapping with a non-empty list 'rules:'")
    lines = _rule_lines(text)
    rules = []
    for i, raw in enumerate(doc["rules"], start=1):
        where = f"--routes {p}" + (f", line {lines[i - 1]}" if i <= len(lines) else "") + f": rule {i}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping with name, match and model (or skip: true)")
        name = str(raw.get("name") or f"rule {i}")
        where += f" ({name})"
        unknown = set(raw) - {"name", "match", "model", "skip"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use name, match, model, skip")
        match = raw.get("match") or {}
        if not isinstance(match, Mapping):
            raise ConfigError(f"{where}: 'match' must be a mapping of conditions")
        bad = set(match) - _KEYS
        if bad:
            raise ConfigError(f"{where}: unknown condition(s) {', '.join(sorted(bad))}; use {', '.join(sorted(_KEYS))}")
        skip = bool(raw.get("skip", False))
        model = raw.get("model")
        if skip == (model is not None):
            raise ConfigError(f"{where}: give either 'model: NAME' (or a chain, 'model: [NAME, NAME]') or 'skip: true'")
        chain: list[str] = []
        if isinstance(model, list):
            if not model or not all(isinstance(m, str) and m for m in model):
                raise ConfigError(f"{where}: 'model' as a list (a chain) needs one or more model names, got {model!r}")
            model, chain = model[0], model[1:]
        elif model is not None and not isinstance(model, str):
            raise ConfigError(f"{where}: 'model' must be a model name or a list of them (a chain), got {model!r}")

        def regex(key: str) -> re.Pattern | None:
            if key not in match:
                return None
            try:
                return re.compile(str(match[key]), re.IGNORECASE)
            except re.error as err:
                raise ConfigError(f"{where}: {key} {match[key]!r} is not a valid regular expression ({err})") from None

        def ints(key: str) -> int | None:
            if key not in match:
                return None
            v = match[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}: {key} must be a whole number >= 0, got {v!r}")
            return v

        mods = match.get("modality", ())
        mods = (mods,) if isinstance(mods, str) else tuple(mods)
        types = match.get("image_type", ())
        types = (types,) if isinstance(types, str) else tuple(types)
        rules.append(Rule(name=name, model=None if skip else str(model), skip=skip,
                          modality=tuple(str(m).upper() for m in mods), body_part=regex("body_part"),
                          series_description=regex("series_description"),
                          image_type=tuple(str(t).upper() for t in types),
                          min_slices=ints("min_slices") or 0, max_slices=ints("max_slices"), then=tuple(chain)))
    return Routes(rules=rules, source=str(p))
