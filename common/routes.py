"""Routing rules: which series rtcontour contours, with which model, and where results go.

A routes file (``RTCONTOUR_ROUTES_FILE``, YAML) is validated once at start-up; a bad file
stops the service with a sentence naming the route and the field::

    routes:
      - name: head-and-neck
        match:                       # every key given must match (regular expressions,
          calling_ae: "TPS"          # case-insensitive, against the whole value)
          series_description: ".*(h&n|head|neck).*"
        model: rtcontour-hn-oar      # package name (newest version) or name-version
        destinations: ["TPS@10.1.2.3:104"]   # replaces RTCONTOUR_DESTINATIONS
        outputs: [RTSTRUCT, SEG]     # also a DICOM SEG (default: the RTSTRUCT alone)
        notify: ["https://chat.clinic/hooks/physics"]  # webhooks for failures and reviews
      - name: pelvis-not-supported
        match: {series_description: ".*pelvis.*"}
        action: ignore               # contour (the default) or ignore
    default: ignore                  # when no route matches: ignore, or a route's name

Routes are tried in order; the first that matches wins. Without a routes file there is one
implicit route, ``default``: contour with the newest package, send to
``RTCONTOUR_DESTINATIONS``. ``RoutingTable.decide`` returns the decision with, for each
route tried, why it did or did not match (``rtcontour routes check``, ``GET /api/routes``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from rtcontour.common.errors import ConfigurationError
from rtcontour.common.settings import Destination, Settings, validate_http_url

__all__ = [
    "IMPLICIT_ROUTE",
    "MATCH_ATTRIBUTES",
    "OUTPUT_KINDS",
    "Route",
    "RouteDecision",
    "RouteTrial",
    "RoutingTable",
    "load_routing",
    "parse_routing",
    "first_instance",
    "series_attributes",
]

logger = logging.getLogger(__name__)

IMPLICIT_ROUTE = "default"

# Match keys that are not DICOM keywords (association values) or that name one by another
# spelling; any other key must be a DICOM keyword (read from the series' first instance).
MATCH_ATTRIBUTES: dict[str, str | None] = {
    "calling_ae": None,
    "called_ae": None,
    "modality": "Modality",
    "body_part_examined": "BodyPartExamined",
    "protocol_name": "ProtocolName",
    "series_description": "SeriesDescription",
    "study_description": "StudyDescription",
    "station_name": "StationName",
}

# What a contour route may ask for (``Route.outputs``).
OUTPUT_KINDS = ("RTSTRUCT", "SEG")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Route(BaseModel):
    """One rule: what to match, and what to do with a series that matches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    match: dict[str, str] = Field(default_factory=dict)
    action: Literal["contour", "ignore"] = "contour"
    model: str | None = None
    destinations: list[str] | None = None
    # What a contour job writes and sends: the RTSTRUCT always, a DICOM SEG of the same
    # structures when listed (None: the RTSTRUCT alone).
    outputs: list[str] | None = None
    # Webhook URLs told when a job of this route fails, ends send_failed or awaits review
    # (besides RTCONTOUR_NOTIFY_WEBHOOKS; see common.notify).
    notify: list[str] | None = None
    # For structure sets (modality RTSTRUCT), where "contour" means: predict the dose and
    # measure what the clinicians changed. The dose package ("name" or "name-version"; None:
    # the newest dose package) and prescriptions by PTV name overriding those read from names.
    dose_model: str | None = None
    prescriptions: dict[str, float] | None = None
    # "required": results wait in awaiting_review until a clinician approves (then sent) or
    # rejects them (never sent); "none" (the default): sent at once.
    review: Literal["required", "none"] = "none"
    # For structure sets: what an organ rtcontour contoured but the approved set does not hold
    # means to the QA of the clinicians' edits. "not_in_approved_set" (the default: many
    # clinics contour only what a plan needs) keeps it out of Dice trends and alerts;
    # "deleted" for a clinic whose approved sets always carry every auto-contoured organ.
    qa_absent: Literal["not_in_approved_set", "deleted"] = "not_in_approved_set"
    # For structure sets (issue 23): keep each approved set that QA compared, CT and approved
    # contours, as training data in the site data set (models.site_data; off by default).
    keep_for_training: bool = False
    # A contour route's second package, run in shadow: its contours are never sent, and QA
    # compares them with what the clinicians approve beside the active model's. An admin
    # switch (POST /api/routes/{name}/switch) swaps the two (common.route_models).
    shadow_model: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a route name (1-64 letters, digits, '-', '_' or '.')"
            )
        return value

    @field_validator("match")
    @classmethod
    def _check_match(cls, value: dict[str, str]) -> dict[str, str]:
        for key, pattern in value.items():
            if key not in MATCH_ATTRIBUTES and tag_for_keyword(key) is None:
                known = ", ".join(MATCH_ATTRIBUTES)
                raise ValueError(
                    f"{key!r} is neither one of {known} nor a DICOM keyword (e.g. Manufacturer)"
                )
            if not isinstance(pattern, str):
                raise ValueError(f"{key}: the pattern must be a string, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"{key}: {pattern!r} is not a regular expression ({error})"
                ) from None
        return value

    @field_validator("destinations")
    @classmethod
    def _check_destinations(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [str(Destination.parse(text)) for text in value]

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        kinds = [str(kind).strip().upper() for kind in value]
        unknown = [kind for kind in kinds if kind not in OUTPUT_KINDS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not an output kind "
                             f"(one of {', '.join(OUTPUT_KINDS)})")
        if "RTSTRUCT" not in kinds:
            raise ValueError("the RTSTRUCT is always written; list it, e.g. [RTSTRUCT, SEG]")
        return list(dict.fromkeys(kinds))

    @field_validator("notify")
    @classmethod
    def _check_notify(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [validate_http_url(url) for url in value]

    @field_validator("prescriptions")
    @classmethod
    def _check_prescriptions(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for name, gy in (value or {}).items():
            if not 0 < gy <= 100:
                raise ValueError(f"{name}: {gy} Gy is not a prescription (0 to 100 Gy)")
        return value

    @model_validator(mode="after")
    def _check_action(self) -> Route:
        given = (self.model, self.destinations, self.dose_model, self.prescriptions,
                 self.outputs, self.shadow_model, self.keep_for_training or None)
        if self.action == "ignore" and any(value is not None for value in given):
            raise ValueError("an ignore route takes no model and no destinations")
        return self

    def parsed_destinations(self) -> list[Destination] | None:
        """The route's destinations, or None when it keeps RTCONTOUR_DESTINATIONS."""
        if self.destinations is None:
            return None
        return [Destination.parse(text) for text in self.destinations]

    def explain(self, attributes: Mapping[str, str]) -> tuple[bool, str]:
        """(matches, why): the first key that does not match, or that every key matched."""
        for key, pattern in self.match.items():
            value = attributes.get(key, "")
            if re.fullmatch(pattern, value, flags=re.IGNORECASE | re.DOTALL) is None:
                return False, f"{key} {value!r} does not match {pattern!r}"
        if not self.match:
            return True, "matches every series (no match keys)"
        return True, "every key matched: " + ", ".join(
            f"{key} {attributes.get(key, '')!r}" for key in self.match
        )


@dataclass(frozen=True)
class RouteTrial:
    """One route tried for a series: did it match, and why (not)."""

    route: str
    matched: bool
    why: str


@dataclass(frozen=True)
class RouteDecision:
    """What happens to a series: the route that took it (None: none matched and the default
    is ignore), the action, a sentence saying why, and every route tried on the way."""

    route: Route | None
    action: Literal["contour", "ignore"]
    reason: str
    trials: list[RouteTrial] = field(default_factory=list)

    @property
    def route_name(self) -> str | None:
        return self.route.name if self.route is not None else None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the API and the CLI."""
        return {
            "route": self.route_name,
            "action": self.action,
            "reason": self.reason,
            "model": self.route.model if self.route is not None else None,
            "destinations": self.route.destinations if self.route is not None else None,
            "review": self.route.review if self.route is not None else None,
            "outputs": self.route.outputs if self.route is not None else None,
            "trials": [
                {"route": trial.route, "matched": trial.matched, "why": trial.why}
                for trial in self.trials
            ],
        }


class RoutingTable(BaseModel):
    """The ordered routes and the default (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[Route] = Field(default_factory=list)
    default: str = "ignore"
    source: str | None = Field(default=None, exclude=True)  # the file it came from (None: implicit)

    @model_validator(mode="after")
    def _check_names(self) -> RoutingTable:
        names = [route.name for route in self.routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"route names must be unique; repeated: {', '.join(duplicates)}")
        if self.default != "ignore" and self.default not in names:
            raise ValueError(
                f"default: {self.default!r} is neither 'ignore' nor the name of a route"
            )
        return self

    @classmethod
    def implicit(cls) -> RoutingTable:
        """Today's behaviour without a routes file: contour everything, newest package."""
        return cls(routes=[Route(name=IMPLICIT_ROUTE)], default=IMPLICIT_ROUTE)

    def route(self, name: str) -> Route | None:
        return next((route for route in self.routes if route.name == name), None)


    def decide(self, attributes: Mapping[str, str]) -> RouteDecision:
        """The first matching route's decision for a series with ``attributes``."""
        trials = []
        for route in self.routes:
            matched, why = route.explain(attributes)
            trials.append(RouteTrial(route.name, matched, why))
            if matched:
                return RouteDecision(route, route.action, f"route {route.name}: {route.action}",
                                     trials)
        if self.default == "ignore":
            return RouteDecision(None, "ignore", "no route matched", trials)
        fallback = self.route(self.default)
        if fallback is None:  # excluded by validation; kept for type narrowing
            raise ConfigurationError(f"default route {self.default!r} does not exist")
        return RouteDecision(
            fallback,
            fallback.action,
            f"no route matched; default route {fallback.name}: {fallback.action}",
            trials,
        )


def _sentence(error: ValidationError, document: Mapping[str, Any], source: str) -> str:
    """One sentence per problem, naming the route (by name where it has one) and the field."""
    problems = []
    routes = document.get("routes") if isinstance(document, Mapping) else None
    for item in error.errors():
        location = list(item["loc"])
        where = "routing"
        if location[:1] == ["routes"] and len(location) > 1 and isinstance(location[1], int):
            index = location[1]
            name = None
            if isinstance(routes, list) and index < len(routes) and isinstance(routes[index], dict):
                name = routes[index].get("name")
            where = f"route {name!r}" if name else f"route #{index + 1}"
            location = location[2:]
        elif location:
            where = "the file"
        field_name = ".".join(str(part) for part in location) or "(whole route)"
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}, field {field_name}: {message}")
    return f"routes file {source}: " + "; ".join(problems)


def parse_routing(document: Any, source: str = "<routes>") -> RoutingTable:
    """Validate a parsed routes document; ``ConfigurationError`` with a sentence if invalid."""
    if not isinstance(document, Mapping):
        raise ConfigurationError(f"routes file {source}: expected a mapping with 'routes', "
                                 f"got {type(document).__name__}")
    if "routes" not in document:
        raise ConfigurationError(f"routes file {source}: the key 'routes' is missing")
    try:
        table = RoutingTable.model_validate(dict(document))
    except ValidationError as error:
        raise ConfigurationError(_sentence(error, document, source)) from None
    return table.model_copy(update={"source": source})


def load_routing(settings: Settings) -> RoutingTable:
    """The routing table of ``settings`` (``RTCONTOUR_ROUTES_FILE``, or the implicit one)."""
    path = settings.routes_file
    if path is None:
        return RoutingTable.implicit()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"routes file {path} cannot be read: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigurationError(f"routes file {path} is not valid YAML{where}: "
                                 f"{getattr(error, 'problem', error)}") from None
    return parse_routing(document, str(path))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def series_attributes(
    first_instance: pydicom.Dataset | None,
    *,
    calling_ae: str = "",
    called_ae: str = "",
    keywords: list[str] | None = None,
) -> dict[str, str]:
    """The values routes match against: the association's AE titles, the named attributes
    (``MATCH_ATTRIBUTES``) and any extra DICOM ``keywords`` of the series' first instance."""
    attributes = {"calling_ae": calling_ae.strip(), "called_ae": called_ae.strip()}
    for key, keyword in MATCH_ATTRIBUTES.items():
        if keyword is not None:
            attributes[key] = _text(first_instance.get(keyword)) if first_instance else ""
    for keyword in keywords or []:
        if keyword not in attributes:
            attributes[keyword] = _text(first_instance.get(keyword)) if first_instance else ""
    return attributes


def match_keywords(table: RoutingTable) -> list[str]:
    """The DICOM keywords the table's routes match on beyond ``MATCH_ATTRIBUTES``."""
    found: list[str] = []
    for route in table.routes:
        for key in route.match:
            if key not in MATCH_ATTRIBUTES and key not in found:
                found.append(key)
    return found


def first_instance(folder: Path, tries: int = 3) -> pydicom.Dataset | None:
    """The header of a series folder's first readable ``*.dcm`` (by name; ``tries`` tried), or
    None: routes then match empty attributes."""
    for path in sorted(folder.glob("*.dcm"))[:tries]:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            logger.warning("routing: %s is unreadable; trying the next instance", path.name)
    return None
