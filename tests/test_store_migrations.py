"""Migrations under concurrency: many processes opening one new store file at the same moment."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from iotbiz.errors import StoreError
from iotbiz.store import SCHEMA_VERSION, Store

PROCESSES = 6
ROUNDS = 60  # 360 opens: 60 new files, each opened by 6 processes at once
BARRIER_TIMEOUT_S = 30.0


def _open_each(folder: str, rounds: int, barrier: Barrier) -> list[str]:
    """In a child process: for each round, wait for every process, then open that round's file."""

    async def open_once(path: Path) -> str:
        try:
            store = await Store.open(path)
        except StoreError as exc:
            return f"{path.name}: {exc}"
        try:
            version = await store.schema_version()
            await store.list_customers()  # the schema is there, not only the version
        finally:
            await store.close()
        return "" if version == SCHEMA_VERSION else f"{path.name}: version {version}"

    problems = []
    for round_number in range(rounds):
        barrier.wait(BARRIER_TIMEOUT_S)
        problem = asyncio.run(open_once(Path(folder) / f"round-{round_number}.db"))
        if problem:
            problems.append(problem)
    return problems


def _child(folder: str, rounds: int, barrier: Barrier, results: multiprocessing.Queue[str]) -> None:
    try:
        problems = _open_each(folder, rounds, barrier)
    except Exception as exc:  # reported to the test, which fails with it
        problems = [f"{type(exc).__name__}: {exc}"]
    results.put("\n".join(problems))


@pytest.mark.timeout(120)
def test_concurrent_first_opens_all_succeed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results: multiprocessing.Queue[str] = context.Queue()
    children = [
        context.Process(target=_child, args=(str(tmp_path), ROUNDS, barrier, results))
        for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=90) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    problems = [line for report in reports for line in report.splitlines() if line]
    assert problems == [], f"{len(problems)} of {PROCESSES * ROUNDS} opens failed: {problems}"
    for round_number in range(ROUNDS):
        with sqlite3.connect(tmp_path / f"round-{round_number}.db") as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
            assert {"customers", "devices", "audit_log", "accounts"} <= tables
