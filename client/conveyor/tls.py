"""TLS to a conveyor server, for the clients, the worker and the command line.

gRPC Python reads a channel's certificates once, when the channel is made: the files are
read each time a channel is made, so a worker (which makes a new channel when its
connection goes silent) picks up rotated files, and a client's own channel follows them
(_reloading.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grpc

CA_ENV, CERT_ENV, KEY_ENV, TLS_ENV = (
    "CONVEYOR_TLS_CA",
    "CONVEYOR_TLS_CERT",
    "CONVEYOR_TLS_KEY",
    "CONVEYOR_TLS",
)


@dataclasses.dataclass(frozen=True)
class Tls:
    """Talk TLS: trust the server's certificate if `ca_file` (PEM) signed it, or, without
    one, if the system's roots do; with `cert_file` and `key_file`, present them (mutual TLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, from the files as they are now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    @classmethod
    def from_environment(cls) -> Tls | None:
        """TLS as $CONVEYOR_TLS_CA, $CONVEYOR_TLS_CERT and $CONVEYOR_TLS_KEY say (or
        $CONVEYOR_TLS=1, with the system's roots); None if none is set."""
        ca, cert, key = (os.environ.get(name) or None for name in (CA_ENV, CERT_ENV, KEY_ENV))
        if ca is None and cert is None and key is None:
            return cls() if os.environ.get(TLS_ENV, "") not in ("", "0") else None
        return cls(ca, cert, key)


def chosen(tls: Tls | bool | None) -> Tls | None:
    """The TLS a client's own channel talks (None: plaintext). `tls` None means as the
    environment says, True TLS with the system's roots, False plaintext."""
    if tls is None:
        return Tls.from_environment()
    if tls is True:
        return Tls()
    return tls or None


def credentials(tls: Tls | bool | None) -> grpc.ChannelCredentials | None:
    """The credentials a channel is made with, from the files as they are now (None:
    plaintext); `tls` as `chosen` reads it."""
    found = chosen(tls)
    return found.credentials() if found is not None else None


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
