"""Where model packages are found for a request ("name", "name-version" or None), and the
start-up check that every model the routing rules name is installed.

Shared by the edges (listener, serve, API, ``rtcontour routes``), which check at start, and
the worker, which loads what a job's route asks for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rtcontour.common.errors import ConfigurationError, ModelPackageError
from rtcontour.common.routes import RoutingTable, load_routing
from rtcontour.common.settings import Settings
from rtcontour.models.package import MANIFEST_NAME, default_packages_root, find_latest_package

logger = logging.getLogger(__name__)

__all__ = [
    "check_routes_models",
    "load_checked_routing",
    "resolve_dose_package",
    "resolve_package_path",
]


def resolve_package_path(settings: Settings, request: str | None = None) -> Path:
    """The package folder for a model ``request``: a package name (its newest version),
    ``name-version``, or None (``settings.model_package``, else the newest package)."""
    root = settings.model_packages_dir or default_packages_root()
    if request is None:
        if settings.model_package is not None:
            return Path(settings.model_package)
        try:
            return Path(find_latest_package(root))
        except ModelPackageError:
            raise
        except Exception as exc:  # e.g. no package folder yet
            raise ModelPackageError(
                f"no model package found (set RTCONTOUR_MODEL_PACKAGE): {exc}"
            ) from exc
    exact = root / request
    if (exact / MANIFEST_NAME).is_file():
        return exact
    try:
        return Path(find_latest_package(root, name=request))
    except ModelPackageError:
        installed = sorted(p.name for p in root.glob("*") if (p / MANIFEST_NAME).is_file())
        raise ModelPackageError(
            f"model package {request!r} is not installed in {root} "
            f"(installed: {', '.join(installed) or 'none'})"
        ) from None


def resolve_dose_package(settings: Settings, request: str | None) -> Path:
    """The dose package for ``request`` ("name", "name-version", None: the newest)."""
    root = settings.model_packages_dir or default_packages_root()
    if request is not None and (root / request / MANIFEST_NAME).is_file():
        return root / request
    try:
        return Path(find_latest_package(root, name=request, kind="dose"))
    except ModelPackageError:
        what = f"dose model package {request!r}" if request else "no dose model package"
        raise ModelPackageError(f"{what} is not installed in {root}") from None


def check_routes_models(settings: Settings, table: RoutingTable) -> dict[str, Path]:
    """The package folder of every model the routes name; ``ConfigurationError`` naming the
    route if one is not installed. (A route without ``model`` takes the newest package, found
    when its first job runs, as without routes.)"""
    found: dict[str, Path] = {}
    for route in table.routes:
        if route.action != "contour" or route.model is None:
            continue
        try:
            path = resolve_package_path(settings, route.model)
        except ModelPackageError as error:
            raise ConfigurationError(f"route {route.name!r}, field model: {error}") from None
        found[route.model] = path
    for route in table.routes:
        if route.action != "contour" or route.shadow_model is None:
            continue
        try:
            found[route.shadow_model] = resolve_package_path(settings, route.shadow_model)
        except ModelPackageError as error:
            raise ConfigurationError(
                f"route {route.name!r}, field shadow_model: {error}") from None
    for route in table.routes:
        if route.action != "contour" or route.dose_model is None:
            continue
        try:
            found[route.dose_model] = resolve_dose_package(settings, route.dose_model)
        except ModelPackageError as error:
            raise ConfigurationError(
                f"route {route.name!r}, field dose_model: {error}") from None
    return found


def load_checked_routing(settings: Settings) -> RoutingTable:
    """The routing rules of ``settings``, with every model a route names found installed
    (``ConfigurationError`` with a sentence otherwise): what each process checks at start."""
    table = load_routing(settings)
    for request, path in check_routes_models(settings, table).items():
        logger.info("routing: model %s is %s", request, path)
    if table.source is not None:
        logger.info("routing: %d route(s) from %s, default %s", len(table.routes), table.source,
                    table.default)
    return table
