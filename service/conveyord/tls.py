"""TLS for conveyord: its certificate and key, and a client CA for mutual TLS, from files
that are read again when they change, at the next new connection (gRPC's dynamic server
credentials ask for them at each handshake), so a rotated certificate needs no restart.
Connections already open keep the certificate they began with.

Safe by default: a server that listens beyond the loopback interface must have TLS and
authentication, unless told `--insecure`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain and key are (PEM), and the CA whose
    certificates clients must present (mutual TLS), if any."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class TlsError(Exception):
    """The TLS files cannot be used: conveyord does not start."""


class CertificateFiles:
    """The server's credentials from `files`, read again once they have changed."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._seen: tuple[tuple[int, int], ...] | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that read the files now, and again at a connection after they change."""
        try:
            initial = self._configuration()
        except (OSError, ValueError) as error:
            raise TlsError(f"cannot read the TLS files: {error}") from error
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self._fetch,  # type: ignore[arg-type]  # None means "no change", as grpc documents
            require_client_authentication=self.files.client_ca is not None,
        )

    def _paths(self) -> list[Path]:
        files = self.files
        return [files.cert, files.key] + ([files.client_ca] if files.client_ca else [])

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        return tuple((path.stat().st_mtime_ns, path.stat().st_size) for path in self._paths())

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        stamp = self._stamp()
        cert, key = self.files.cert.read_bytes(), self.files.key.read_bytes()
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise ValueError(f"{self.files.cert} and {self.files.key} must be PEM files")
        ca = self.files.client_ca.read_bytes() if self.files.client_ca else None
        self._seen = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """At a new connection: the files' new contents if they changed, else None (keep)."""
        try:
            if self._stamp() == self._seen:
                return None
            configuration = self._configuration()
        except (OSError, ValueError) as error:
            log.error("the TLS files changed but cannot be read; the old ones stay: %s", error)
            return None
        log.info("TLS files changed: new connections get the new certificate")
        return configuration


class ExposureRefused(Exception):
    """conveyord was asked to listen beyond the loopback interface without the protection
    that needs: it does not start."""

    exit_code = 3


def check_exposure(
    listen: str, tls: TlsFiles | None, insecure: bool, *, authenticated: bool = False
) -> None:
    """Refuse a listen address beyond the loopback interface without TLS and authentication
    (`authenticated`: a token file), unless `insecure`; warn when it is."""
    if is_loopback(listen) or (tls is not None and authenticated):
        return
    if not insecure:
        needs = ["TLS (--tls-cert, --tls-key)"] if tls is None else []
        needs += [] if authenticated else ["authentication (--token-file)"]
        missing = " and ".join(needs)
        raise ExposureRefused(
            f"conveyord will not listen on {listen}, beyond this machine, without {missing}: "
            "anyone who reaches it could read, create and cancel every task. Listen on "
            "127.0.0.1, or pass --insecure to accept that"
        )
    what = "no TLS" if tls is None else "TLS"
    what += " and no authentication" if not authenticated else " and authentication"
    log.warning("listening on %s with --insecure: %s", listen, what)


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT listens on the loopback interface only."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
