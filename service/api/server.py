"""The HTTP protocol ``unlearnd api`` serves with: uvicorn's h11 protocol, with ``TCP_NODELAY`` set on
every connection.

asyncio sets it on the connections of a server it binds itself (``uvicorn --workers 1``), but not
on those of a socket bound without its protocol number, as uvicorn binds the socket it shares
between worker processes (``--workers 2`` and up): there a small answer waited for the client's
delayed acknowledgement, about 40 ms a request on keep-alive connections.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class H11NoDelay(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
