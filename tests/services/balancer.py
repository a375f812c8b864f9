"""A TCP load balancer on loopback, for tests of several platform processes: what nginx (or
HAProxy) does in front of them in production. Each connection goes to the next backend in
turn; a backend that refuses (a killed process) is skipped for the next one, as nginx's
`proxy_next_upstream error` does. Bounded: a connect attempt waits `CONNECT_TIMEOUT_S`.
`backlog` is the listen queue: asyncio's default of 100 unless given (nginx's is 511; a
connect storm through RabbitMQ's HTTP auth backend opens a connection per login at once)."""

from __future__ import annotations

import asyncio
import contextlib

CONNECT_TIMEOUT_S = 2.0
CHUNK = 65536


class Balancer:
    def __init__(self, port: int, *, backlog: int = 100) -> None:
        self.port = port
        self.backlog = backlog
        self.backends: list[int] = []  # ports on 127.0.0.1, tried in turn
        self._next = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, backlog=self.backlog
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            upstream = await self._connect()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._pipes.discard(task)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                continue  # down: the next one
        return None


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
