"""Fine-tuning runs asked for over the API and run by a worker (issue 23).

A run is a folder ``<data dir>/finetune/<run_id>/`` with ``request.json`` (what the admin
asked: :class:`FinetuneRequest`) and ``status.json`` (queued, running, done, refused or failed,
with the step reached, the new package and its report, or the reason). The API writes the
request and publishes ``rtcontour.finetune`` with the run id (:func:`enqueue_finetune`); the
worker that takes it starts the run in a process of its own (``worker.site_training``), so that
contour jobs keep being served while it trains, and the run writes its status as it goes.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rtcontour.common.queue import QUEUE, _publisher_for
from rtcontour.common.settings import Settings

__all__ = [
    "FINETUNE_TASK",
    "FinetuneOptions",
    "FinetuneRequest",
    "create_run",
    "enqueue_finetune",
    "list_runs",
    "read_request",
    "read_status",
    "update_status",
]

# The name on the wire (a rename or new arguments need a new, versioned name).
FINETUNE_TASK = "rtcontour.finetune"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class FinetuneOptions(BaseModel):
    """The options of a run (the body of ``POST /api/finetune``; ``rtcontour finetune``'s)."""

    model_config = ConfigDict(extra="forbid")

    package: str = Field(min_length=1, max_length=96, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    site: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,23}$")
    steps: int | None = Field(None, ge=1, le=1_000_000)
    minutes: float | None = Field(None, gt=0, le=7 * 24 * 60)
    holdout: float = Field(0.2, gt=0, lt=1)
    min_sets: int | None = Field(None, ge=1, le=100_000)
    exclude: list[str] = Field(default_factory=list)
    threads: int = Field(2, ge=1, le=256)
    openkbp_limit: int = Field(8, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_budget(self) -> FinetuneOptions:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give a budget of steps or of minutes (one of them)")
        return self


class FinetuneRequest(FinetuneOptions):
    """A run as queued: the options and who asked for it."""

    requested_by: str = ""

    def command(self) -> str:
        """The equivalent ``rtcontour finetune`` command (for the model card)."""
        parts = ["rtcontour finetune", f"--package {self.package}", f"--site {self.site}",
                 f"--steps {self.steps}" if self.steps is not None else
                 f"--minutes {self.minutes:g}", f"--holdout {self.holdout:g}",
                 f"--threads {self.threads}", f"--openkbp-limit {self.openkbp_limit}"]
        if self.min_sets is not None:
            parts.append(f"--min-sets {self.min_sets}")
        parts += [f"--exclude {name}" for name in self.exclude]
        return " ".join(parts) + " (queued over the API)"


def _folder(settings: Settings, run_id: str) -> Path:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"{run_id!r} is not a fine-tuning run id")
    return settings.finetune_dir / run_id


def _write_json(path: Path, values: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(values, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)


def create_run(settings: Settings, request: FinetuneRequest) -> str:
    """A new run folder with the request and status ``queued``; returns its id."""
    run_id = uuid.uuid4().hex
    folder = _folder(settings, run_id)
    folder.mkdir(parents=True)
    _write_json(folder / "request.json", request.model_dump(mode="json"))
    _write_json(folder / "status.json", {"run_id": run_id, "state": "queued",
                                         "queued_at": time.time()})
    return run_id


def read_request(settings: Settings, run_id: str) -> FinetuneRequest:
    text = (_folder(settings, run_id) / "request.json").read_text(encoding="utf-8")
    return FinetuneRequest.model_validate_json(text)


def read_status(settings: Settings, run_id: str) -> dict[str, Any]:
    path = _folder(settings, run_id) / "status.json"
    if not path.is_file():
        raise FileNotFoundError(f"no fine-tuning run {run_id}")
    values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return values


def update_status(settings: Settings, run_id: str, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the run's status (one writer at a time: the run's process)."""
    status = read_status(settings, run_id)
    status.update(values, updated_at=time.time())
    _write_json(_folder(settings, run_id) / "status.json", status)
    return status


def list_runs(settings: Settings) -> list[dict[str, Any]]:
    """Every run's status with its request, newest first."""
    runs = []
    if settings.finetune_dir.is_dir():
        for folder in settings.finetune_dir.iterdir():
            if _RUN_ID.match(folder.name) and (folder / "status.json").is_file():
                status = read_status(settings, folder.name)
                status["request"] = read_request(settings, folder.name).model_dump(mode="json")
                runs.append(status)
    return sorted(runs, key=lambda run: run.get("queued_at") or 0, reverse=True)


def enqueue_finetune(settings: Settings, run_id: str) -> None:
    """Publish ``rtcontour.finetune`` for ``run_id`` on ``settings``' broker."""
    _publisher_for(settings).send_task(FINETUNE_TASK, args=[run_id], queue=QUEUE,
                                       ignore_result=True)
