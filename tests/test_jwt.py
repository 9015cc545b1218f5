"""Callers named by signed JWTs (RS256, ES256, EdDSA), verified against real keys: a valid
token of each algorithm, from a PEM file and from a JWKS; and an expired, a not-yet-valid,
a wrongly signed, a wrong-audience and a wrong-issuer token, each refused saying why."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conveyor import Client, PermissionDenied, Unauthenticated
from conveyord.auth import JwtSettings
from tests.conftest import ServerThread

StartServer = Callable[..., ServerThread]
ISSUER, AUDIENCE = "https://login.example", "conveyor"


def _pem(key: Any) -> str:
    public = key.public_key()
    encoded: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded.decode()


def _token(key: Any, algorithm: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ci", "exp": now + 300, "nbf": now - 10,
            "tenant": "team-a", "permissions": ["read", "submit"], **claims}  # fmt: skip
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    body.pop("kid", None)
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture
def pem_server(start_server: StartServer, tmp_path: Path, keys: dict[str, Any]) -> ServerThread:
    path = tmp_path / "keys.pem"
    path.write_text("".join(_pem(key) for key in keys.values()))
    return start_server(jwt=JwtSettings(path, ISSUER, AUDIENCE))


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_a_signed_token_names_the_caller(
    pem_server: ServerThread, keys: dict[str, Any], algorithm: str
) -> None:
    with Client(pem_server.address, token=_token(keys[algorithm], algorithm)) as client:
        task = client.create("echo")
        assert client.get(task.task_id).task_id == task.task_id
        with pytest.raises(PermissionDenied, match="control"):
            client.cancel(task.task_id)


def test_a_jwks_file_with_key_ids(start_server: StartServer, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    server = start_server(jwt=JwtSettings(path, ISSUER, AUDIENCE))
    with Client(server.address, token=_token(key, "ES256", kid="k1")) as client:
        assert client.create("echo").task_type == "echo"


@pytest.mark.parametrize(
    ("claims", "signer", "words"),
    [
        ({"exp": int(time.time()) - 60}, "RS256", "expired"),
        ({"nbf": int(time.time()) + 3600}, "RS256", "not yet valid"),
        ({"aud": "someone-else"}, "RS256", "audience"),
        ({"iss": "https://elsewhere"}, "RS256", "issuer"),
        ({}, "stranger", "Signature verification failed"),
    ],
)
def test_a_bad_token_is_refused_saying_why(
    pem_server: ServerThread, keys: dict[str, Any], claims: dict[str, Any], signer: str,
    words: str,
) -> None:  # fmt: skip
    key = rsa.generate_private_key(65537, 2048) if signer == "stranger" else keys[signer]
    token = _token(key, "RS256", **claims)
    with Client(pem_server.address, token=token) as client, pytest.raises(Unauthenticated) as bad:
        client.create("echo")
    assert words.lower() in str(bad.value).lower()


def test_a_token_that_is_not_a_jwt_is_refused(pem_server: ServerThread) -> None:
    with grpc.insecure_channel(pem_server.address) as channel:
        call: Any = channel.unary_unary("/conveyor.v1.TaskService/List")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", metadata=(("authorization", "Bearer a.b.c"),), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
