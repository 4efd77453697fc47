"""Routing rules: validation with sentences a physicist can act on, first match wins."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from rtcontour.common.errors import ConfigurationError
from rtcontour.common.routes import RoutingTable, load_routing, parse_routing, series_attributes
from rtcontour.common.settings import Settings

ROUTES_YAML = """
routes:
  - name: head-and-neck
    match:
      calling_ae: "TPS"
      series_description: ".*(h&n|head|neck).*"
    model: rtcontour-hn-oar
    destinations: ["TPS@10.1.2.3:104", "ARIA@10.1.2.4:104"]
  - name: pelvis-not-supported
    match: {series_description: ".*pelvis.*"}
    action: ignore
  - name: siemens-only
    match: {Manufacturer: "siemens.*"}
default: ignore
"""


def _table(tmp_path: Path, text: str = ROUTES_YAML) -> RoutingTable:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return load_routing(Settings(data_dir=tmp_path / "var", routes_file=path))


def test_first_matching_route_wins_case_insensitive_on_the_whole_value(tmp_path: Path) -> None:
    table = _table(tmp_path)
    decision = table.decide({"calling_ae": "tps", "series_description": "HEAD AND NECK 2mm"})
    assert decision.route_name == "head-and-neck" and decision.action == "contour"
    assert decision.route is not None and decision.route.model == "rtcontour-hn-oar"
    assert decision.route.destinations == ["TPS@10.1.2.3:104", "ARIA@10.1.2.4:104"]
    # The whole value must match: "TPS2" is not "TPS".
    other = table.decide({"calling_ae": "TPS2", "series_description": "head"})
    assert other.route_name is None and other.reason == "no route matched"
    assert other.trials[0].why == "calling_ae 'TPS2' does not match 'TPS'"


def test_ignore_route_and_default_give_their_reasons(tmp_path: Path) -> None:
    table = _table(tmp_path)
    pelvis = table.decide({"calling_ae": "TPS", "series_description": "Pelvis 3mm"})
    assert (pelvis.action, pelvis.reason) == ("ignore", "route pelvis-not-supported: ignore")
    assert [t.matched for t in pelvis.trials] == [False, True]
    assert "series_description 'Pelvis 3mm' does not match" in pelvis.trials[0].why


def test_any_dicom_keyword_of_the_first_instance_can_be_matched(tmp_path: Path) -> None:
    table = _table(tmp_path)
    first = pydicom.Dataset()
    first.Manufacturer = "SIEMENS Healthineers"
    first.SeriesDescription = "Thorax"
    attributes = series_attributes(first, calling_ae="CT1", keywords=["Manufacturer"])
    assert attributes["series_description"] == "Thorax"
    assert table.decide(attributes).route_name == "siemens-only"


def test_default_may_name_a_route(tmp_path: Path) -> None:
    table = _table(tmp_path, ROUTES_YAML.replace("default: ignore", "default: siemens-only"))
    decision = table.decide({"calling_ae": "X"})
    assert decision.route_name == "siemens-only" and decision.action == "contour"
    assert decision.reason == "no route matched; default route siemens-only: contour"


def test_without_a_routes_file_every_series_is_contoured_by_the_newest_package() -> None:
    table = load_routing(Settings())
    decision = table.decide({"calling_ae": "ANY", "series_description": "Pelvis"})
    assert decision.route_name == "default" and decision.action == "contour"
    assert decision.route is not None and decision.route.model is None
    assert decision.route.destinations is None  # RTCONTOUR_DESTINATIONS


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (('calling_ae: "TPS"', 'calling_ae: "TPS("'),
         "route 'head-and-neck', field match: calling_ae: 'TPS(' is not a regular expression"),
        (("calling_ae:", "calling_aet:"),
         "route 'head-and-neck', field match: 'calling_aet' is neither one of"),
        (('"ARIA@10.1.2.4:104"', '"ARIA@10.1.2.4"'),
         "route 'head-and-neck', field destinations: destination 'ARIA@10.1.2.4' is not of "
         "the form AE@host:port"),
        (("action: ignore", "action: skip"),
         "route 'pelvis-not-supported', field action: Input should be 'contour' or 'ignore'"),
        (("default: ignore", "default: nowhere"),
         "field (whole route): default: 'nowhere' is neither 'ignore' nor the name of a route"),
        (("name: siemens-only", "name: pelvis-not-supported"),
         "route names must be unique; repeated: pelvis-not-supported"),
        (("    action: ignore", "    action: ignore\n    model: x"),
         "route 'pelvis-not-supported', field (whole route): an ignore route takes no model"),
        (("    model: rtcontour-hn-oar", "    modle: rtcontour-hn-oar"),
         "route 'head-and-neck', field modle: Extra inputs are not permitted"),
    ],
    ids=["bad-regex", "unknown-key", "bad-destination", "bad-action", "unknown-default",
         "duplicate-name", "ignore-with-model", "misspelt-field"],
)
def test_a_malformed_routes_file_is_refused_with_a_sentence_naming_route_and_field(
    tmp_path: Path, change: tuple[str, str], sentence: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        _table(tmp_path, ROUTES_YAML.replace(*change))
    assert str(refused.value).startswith(f"routes file {tmp_path / 'routes.yaml'}: ")
    assert sentence in str(refused.value)


def test_unreadable_or_non_yaml_files_are_refused_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not valid YAML at line 3"):
        _table(tmp_path, "routes:\n  - name: [unclosed\n")
    with pytest.raises(ConfigurationError, match="the key 'routes' is missing"):
        _table(tmp_path, "default: ignore\n")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_routing(Settings(routes_file=tmp_path / "absent.yaml"))


def test_parse_routing_takes_an_already_parsed_document() -> None:
    table = parse_routing({"routes": [{"name": "all"}], "default": "all"}, "inline")
    assert table.source == "inline" and table.decide({}).route_name == "all"
