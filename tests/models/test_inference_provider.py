"""Which backend a Segmenter runs on is said once, at INFO; a warning only when the GPU that
was asked for is missing (a CPU machine running ``auto`` is not a fallback)."""

from __future__ import annotations

import logging

import onnxruntime
import pytest

from rtcontour.models.inference import Segmenter
from tests.conftest import real_package


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime as on a machine without a GPU, whatever this one has."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture
def package():  # type: ignore[no-untyped-def]
    found = real_package()
    if found is None:
        pytest.skip("no model package under models/packages")
    return found


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rtcontour.models.inference"]


def test_auto_on_a_cpu_machine_logs_the_backend_once_at_info_and_no_warning(
    cpu_only: None, package: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rtcontour.models.inference")
    segmenter = Segmenter(package, provider="auto")  # type: ignore[arg-type]
    records = _records(caplog)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    chosen = [r for r in records if segmenter.backend in r.getMessage()]
    assert len(chosen) == 1 and chosen[0].levelno == logging.INFO


def test_cuda_asked_for_on_a_cpu_machine_warns_that_it_is_missing(
    cpu_only: None, package: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rtcontour.models.inference")
    segmenter = Segmenter(package, provider="cuda")  # type: ignore[arg-type]
    warnings = [r for r in _records(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CUDAExecutionProvider is not available" in warnings[0].getMessage()
    assert segmenter.backend == "onnxruntime[CPUExecutionProvider]"
