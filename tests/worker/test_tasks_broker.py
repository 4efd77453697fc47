"""The embedded broker under load: hundreds of messages from several processes, polled by
several consumers while they are written; each must arrive exactly once, whole."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from kombu import Connection

from rtcontour.common import embedded_broker

N_PRODUCERS = 3
PER_PRODUCER = 150
N_CONSUMERS = 2


def _connection(folder: Path) -> Connection:
    embedded_broker.register()
    return Connection(
        embedded_broker.broker_url(),
        transport_options=embedded_broker.transport_options(folder, polling_interval_s=0.01),
    )


def _produce(folder: str, producer: int) -> None:
    with _connection(Path(folder)) as conn:
        queue = conn.SimpleQueue("jobs")
        for index in range(PER_PRODUCER):
            # big enough that a half-written file would be caught
            queue.put({"id": f"{producer}-{index}", "pad": "x" * 20000})
        queue.close()


def _consume(folder: str, out: multiprocessing.Queue, stop_after_s: float) -> None:
    received, errors = [], []
    deadline = time.monotonic() + stop_after_s
    with _connection(Path(folder)) as conn:
        queue = conn.SimpleQueue("jobs")
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            try:
                message = queue.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() - idle_since > 3:
                    break
                continue
            except Exception as exc:  # a torn message would surface here
                errors.append(repr(exc))
                continue
            idle_since = time.monotonic()
            payload = message.payload
            if len(payload["pad"]) != 20000:
                errors.append(f"short payload {payload['id']}")
            received.append(payload["id"])
            message.ack()
        queue.close()
    out.put((received, errors))


def test_concurrent_producers_and_polling_consumers_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    folder = str(tmp_path / "broker")
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    consumers = [
        context.Process(target=_consume, args=(folder, results, 90)) for _ in range(N_CONSUMERS)
    ]
    for consumer in consumers:
        consumer.start()
    producers = [context.Process(target=_produce, args=(folder, p)) for p in range(N_PRODUCERS)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join(60)
        assert producer.exitcode == 0
    collected = [results.get(timeout=90) for _ in consumers]
    for consumer in consumers:
        consumer.join(10)
    received = [mid for ids, _ in collected for mid in ids]
    errors = [err for _, errs in collected for err in errs]
    assert errors == [], f"{len(errors)} torn/unreadable messages, e.g. {errors[:3]}"
    expected = {f"{p}-{i}" for p in range(N_PRODUCERS) for i in range(PER_PRODUCER)}
    assert set(received) == expected, f"lost {len(expected - set(received))} messages"
    assert len(received) == len(expected), "duplicates"
    assert all(ids for ids, _ in collected), "every consumer should have taken some"
    leftovers = [p for sub in ("queue", "claimed") for p in (Path(folder) / sub).iterdir()]
    assert leftovers == []
