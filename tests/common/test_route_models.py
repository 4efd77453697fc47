"""A route's shadow package, keep_for_training, and the admin's switch (common.route_models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.route_models import RouteModelStore, effective_models
from rtcontour.common.routes import parse_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings


def _route(**values: object):  # type: ignore[no-untyped-def]
    return parse_routing({"routes": [{"name": "hn", **values}]}).routes[0]


def test_route_takes_a_shadow_model_and_keep_for_training_off_by_default() -> None:
    assert _route().keep_for_training is False and _route().shadow_model is None
    route = _route(model="pkg-1.0.0", shadow_model="pkg-1.0.0+clinic.1", keep_for_training=True)
    assert route.shadow_model == "pkg-1.0.0+clinic.1" and route.keep_for_training


@pytest.mark.parametrize("values", [{"shadow_model": "pkg-1.0.0"}, {"keep_for_training": True}],
                         ids=["shadow_model", "keep_for_training"])
def test_ignore_route_refuses_shadow_and_keep(values: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="route 'hn'"):
        _route(action="ignore", **values)


def test_switch_swaps_active_and_shadow_and_back_until_the_file_changes(tmp_path: Path) -> None:
    engine = make_engine(Settings(data_dir=tmp_path))
    create_schema(engine)
    store = RouteModelStore(engine)
    route = _route(model="base-1.0.0", shadow_model="base-1.0.0+clinic.1")
    assert effective_models(engine, route).model == "base-1.0.0"
    switched = store.switch(route, "physicist")
    assert (switched.model, switched.shadow_model) == ("base-1.0.0+clinic.1", "base-1.0.0")
    assert switched.switched and switched.switched_by == "physicist"
    back = store.switch(route, "physicist")
    assert (back.model, back.shadow_model) == ("base-1.0.0", "base-1.0.0+clinic.1")
    store.switch(route, "physicist")
    edited = _route(model="base-1.0.0", shadow_model="base-1.0.0+clinic.2")
    assert effective_models(engine, edited).model == "base-1.0.0"  # the file's new pair wins
    with pytest.raises(ValueError, match="no shadow_model"):
        store.switch(_route(model="base-1.0.0"), "physicist")
    default = store.switch(_route(shadow_model="base-1.0.0+clinic.1"), "physicist",
                           default_model="base-1.0.0")
    assert (default.model, default.shadow_model) == ("base-1.0.0+clinic.1", "base-1.0.0")
