"""Which package a route runs, and which in shadow, after an admin switched them (issue 23).

A route's ``model`` and ``shadow_model`` come from the routes file. An admin's switch
(``POST /api/routes/{name}/switch``, audited) swaps the two for that route and is stored here,
in the database every process shares, so that the intake (which model a new job asks for) and
the worker (which model runs in shadow) agree without editing the routes file; a second
switch swaps them back. ``effective_models`` gives what a route runs now.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common.db import Base, UtcDateTime, utcnow
from rtcontour.common.routes import Route

__all__ = ["RouteModels", "RouteModelOverride", "RouteModelStore", "effective_models"]


class RouteModelOverride(Base):
    """A route's active and shadow package as an admin last switched them."""

    __tablename__ = "route_models"

    route_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(96))
    shadow_model: Mapped[str | None] = mapped_column(String(96))
    # the routes file's pair when the switch was made: an edited file supersedes the switch
    file_model: Mapped[str | None] = mapped_column(String(96))
    file_shadow_model: Mapped[str | None] = mapped_column(String(96))
    switched_by: Mapped[str] = mapped_column(String(64), default="")
    switched_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)


@dataclass(frozen=True)
class RouteModels:
    """What a route runs now: ``model`` (sent; None: the default package), ``shadow_model``
    (run beside it, never sent; None: no shadow), and whether an admin switch made it so."""

    model: str | None
    shadow_model: str | None
    switched: bool = False
    switched_by: str | None = None
    switched_at: dt.datetime | None = None


class RouteModelStore:
    """The ``route_models`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, route_name: str) -> RouteModelOverride | None:
        with Session(self.engine) as session:
            return session.get(RouteModelOverride, route_name)

    def effective(self, route: Route) -> RouteModels:
        """The route's pair, switched if an admin switched it since the file last changed."""
        override = self.get(route.name)
        if override is None or (override.file_model, override.file_shadow_model) != (
                route.model, route.shadow_model):
            return RouteModels(route.model, route.shadow_model)
        return RouteModels(override.model, override.shadow_model, True, override.switched_by,
                           override.switched_at)

    def switch(self, route: Route, user: str, default_model: str | None = None) -> RouteModels:
        """Swap the route's active and shadow package (``ValueError`` without a shadow);
        ``default_model`` names the package a route without ``model`` runs (it becomes the
        shadow, so that the switch can be undone)."""
        now = self.effective(route)
        if now.model is None and default_model is not None:
            now = RouteModels(default_model, now.shadow_model)
        if now.shadow_model is None:
            raise ValueError(f"route {route.name!r} has no shadow_model to switch to")
        with Session(self.engine) as session, session.begin():
            row = session.get(RouteModelOverride, route.name)
            if row is None:
                row = RouteModelOverride(route_name=route.name)
                session.add(row)
            row.model, row.shadow_model = now.shadow_model, now.model
            row.file_model, row.file_shadow_model = route.model, route.shadow_model
            row.switched_by, row.switched_at = user[:64], utcnow()
        return self.effective(route)

    def all(self) -> list[RouteModelOverride]:
        with Session(self.engine) as session:
            return list(session.scalars(select(RouteModelOverride)))


def effective_models(engine: Engine | None, route: Route | None) -> RouteModels:
    """What ``route`` runs now (no route: the default package, no shadow)."""
    if route is None:
        return RouteModels(None, None)
    if engine is None:
        return RouteModels(route.model, route.shadow_model)
    return RouteModelStore(engine).effective(route)
