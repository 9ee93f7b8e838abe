"""Why a pool closes a connection, counted once each: overflow (churn), unpooled, recycled,
invalidated, disposed; and every connection opened is closed, idle or in use."""

import time
from collections.abc import Callable

from conftest import total
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.pool import NullPool

from session_monitor import SessionMonitor

CLOSED = "sqlalchemy_pool_closed_connections_total"


def closed(registry: CollectorRegistry) -> dict[str, float]:
    reasons = ("overflow", "unpooled", "recycled", "invalidated", "disposed")
    return {reason: total(registry, CLOSED, reason=reason) for reason in reasons}


def opened_equals_closed_plus_open(registry: CollectorRegistry) -> bool:
    created = total(registry, "db_client_connection_create_time_seconds_count")
    still_open = total(registry, "db_client_connection_count")
    return created == total(registry, CLOSED) + still_open


def test_a_connection_back_to_a_full_pool_is_closed_as_overflow(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=1, max_overflow=2)
    make_monitor(engine, registry=registry)
    for _ in range(3):  # a peak of three, then none: two are closed again each time
        connections = [engine.connect() for _ in range(3)]
        for connection in connections:
            connection.execute(text("select 1"))
            connection.close()
    assert closed(registry) == {
        "overflow": 6, "unpooled": 0, "recycled": 0, "invalidated": 0, "disposed": 0
    }
    assert opened_equals_closed_plus_open(registry)
    engine.dispose()  # the one idle connection
    assert closed(registry)["disposed"] == 1
    assert opened_equals_closed_plus_open(registry)


def test_invalidated_and_recycled_connections_are_told_apart(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, pool_size=1, max_overflow=0, pool_recycle=1)
    make_monitor(engine, registry=registry)
    with engine.connect() as connection:
        connection.invalidate()  # the app's own invalidate(): closed at once
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    time.sleep(1.2)  # older than pool_recycle: the next checkout closes and reopens it
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    assert closed(registry) == {
        "overflow": 0, "unpooled": 0, "recycled": 1, "invalidated": 1, "disposed": 0
    }
    assert opened_equals_closed_plus_open(registry)


def test_a_null_pool_closes_every_connection_as_unpooled(
    make_engine: Callable[..., Engine],
    sqlite_url: str,
    registry: CollectorRegistry,
    make_monitor: Callable[..., SessionMonitor],
) -> None:
    engine = make_engine(sqlite_url, poolclass=NullPool)
    make_monitor(engine, registry=registry)
    for _ in range(4):
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    assert closed(registry)["unpooled"] == 4
    assert total(registry, CLOSED) == 4
