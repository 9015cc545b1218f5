"""A client's own TLS channel that follows its certificate files.

gRPC Python reads a channel's certificates once, when the channel is made (grpc #15735), so
a client that runs for months would keep presenting, and trusting, what its files held when
it started. This channel looks at the files again at a call, once a `RECHECK_EVERY` at most;
when one of them changed, the calls from then on go on a new channel made from them (on new
connections, with the new certificates), while calls under way finish on the old one. The
channel it replaced is closed at the next replacement, or with the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc

from conveyor.tls import Tls

RECHECK_EVERY = 1.0  # seconds: how often the TLS files are looked at, at most

_Stamp = tuple[tuple[int, int] | None, ...]


class _Method:
    """A method's multicallable, on whichever channel is current when it is called."""

    def __init__(self, owner: _Reloading, kind: str, args: tuple[Any, ...], kwargs: Any):
        self._owner, self.kind, self.args, self.kwargs = owner, kind, args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner.multicallable(self)(*args, **kwargs)


class _Reloading:
    """What the blocking and the asyncio channels share: when to make a new channel."""

    def __init__(
        self,
        tls: Tls,
        make: Callable[[grpc.ChannelCredentials], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls, self._make, self._clock = tls, make, clock
        self._stamp = self._files_now()
        self._checked = clock()
        self.current = make(tls.credentials())
        self.retired: Any = None  # the channel replaced last, closed at the next replacement
        self._callables: dict[_Method, Any] = {}

    def unary_unary(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "unary_stream", args, kwargs)

    def multicallable(self, method: _Method) -> Any:
        self._follow_files()
        found = self._callables.get(method)
        if found is None:
            found = getattr(self.current, method.kind)(*method.args, **method.kwargs)
            self._callables[method] = found
        return found

    def _follow_files(self) -> None:
        now = self._clock()
        if now - self._checked < RECHECK_EVERY:
            return
        self._checked = now
        stamp = self._files_now()
        if stamp == self._stamp:
            return
        try:
            credentials = self._tls.credentials()
        except OSError:
            return  # written halfway, or moved: the next look will tell
        self._stamp = stamp
        if self.retired is not None:
            self._close_soon(self.retired)
        self.retired, self.current = self.current, self._make(credentials)
        self._callables = {}

    def _files_now(self) -> _Stamp:
        tls = self._tls
        return tuple(_stamp(path) for path in (tls.ca_file, tls.cert_file, tls.key_file))

    def _close_soon(self, channel: Any) -> None:
        raise NotImplementedError


def _stamp(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        found = Path(path).stat()
    except OSError:
        return None
    return found.st_mtime_ns, found.st_size


class ReloadingChannel(_Reloading):
    """A blocking channel (grpc.Channel) that follows its TLS files."""

    def _close_soon(self, channel: grpc.Channel) -> None:
        channel.close()

    def close(self) -> None:
        for channel in (self.current, self.retired):
            if channel is not None:
                channel.close()


class AsyncReloadingChannel(_Reloading):
    """An asyncio channel (grpc.aio.Channel) that follows its TLS files."""

    _closing: ClassVar[set[asyncio.Task[None]]] = set()  # kept until done, as asyncio asks

    def _close_soon(self, channel: grpc.aio.Channel) -> None:
        closing = asyncio.ensure_future(channel.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for channel in (self.current, self.retired):
            if channel is not None:
                await channel.close()
