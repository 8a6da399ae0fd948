"""The official `anthropic` Python SDK over HTTPS: the real `spillway` binary
terminating TLS itself (`server.tls_cert` / `tls_key`), in front of the real
simulator.

* The SDK, given `base_url="https://..."` and an HTTP client that trusts the
  gateway's CA, sends unary and streamed messages as it would to Anthropic.
* A client certificate is a credential (`server.tls_client_ca`, `client_cert =
  "optional"`): the SDK with a certificate listed for a tenant is that tenant,
  whatever placeholder key it sends (the SDK always sends one), and is
  counted as that tenant.
* An SDK that does not trust the gateway's certificate fails to connect.

Certificates are made here with `cryptography` (a CA, the gateway's leaf for
127.0.0.1, a client CA and a client leaf); nothing is checked in.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import anthropic
import pytest
from anthropic import Anthropic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import REPO, UPSTREAM_TOKEN, Process, _binary, _free_port, _key_digest, _start_sim

HAIKU = "claude-3-haiku@20240307"
KEY = "sk-spw-tls-tests-0123456789abcdefghijklmnopqrstuvwx"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: Optional[ec.EllipticCurvePrivateKey] = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@dataclass(frozen=True)
class TlsStack:
    url: str  # https://127.0.0.1:PORT
    ca: Path  # the CA that signed the gateway's certificate
    client_cert: Path  # a client certificate mapped to tenant `by-cert` (key beside it)
    log: Process

    def context(self, with_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_cert.with_suffix(".key")))
        return ctx

    def sdk(self, key: str, with_client_cert: bool = False) -> Anthropic:
        http = anthropic.DefaultHttpxClient(verify=self.context(with_client_cert), trust_env=False)
        return Anthropic(api_key=key, base_url=self.url, http_client=http, max_retries=0)

    def metrics(self) -> str:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.context())
        )
        with opener.open(f"{self.url}/metrics", timeout=10) as resp:
            return resp.read().decode()


@pytest.fixture
def tls_stack(tmp_path: Path) -> Iterator[TlsStack]:
    spillway_bin = _binary("SPILLWAY_BIN", "target/debug/spillway")
    sim_bin = _binary("SPILLWAY_SIM_BIN", "target/debug/spillway-sim")
    server_ca = _ca("spillway test CA")
    ca_path = _write(tmp_path / "ca.pem", server_ca[0])
    server_cert = _write(tmp_path / "server.pem", *_leaf(server_ca, "spillway", server=True))
    client_ca = _ca("client CA")
    client_ca_path = _write(tmp_path / "clients.pem", client_ca[0])
    client_leaf = _leaf(client_ca, "search-service", server=False)
    client_cert = _write(tmp_path / "client.pem", *client_leaf)
    fingerprint = hashlib.sha256(client_leaf[0].public_bytes(serialization.Encoding.DER)).hexdigest()
    with ExitStack() as cleanup:
        sim, sim_url = _start_sim(sim_bin, tmp_path)
        cleanup.callback(sim.stop)
        port = _free_port()
        q = json.dumps
        config = tmp_path / "tls.toml"
        config.write_text(
            f"""
[server]
listen = {q(f"127.0.0.1:{port}")}
auth = "api_key"
tls_cert = {q(str(server_cert))}
tls_key = {q(str(server_cert.with_suffix(".key")))}
tls_client_ca = {q(str(client_ca_path))}
client_cert = "optional"

[upstream]
regional_url = {q(sim_url)}
global_url = {q(sim_url)}
auth = "static"
token = {q(UPSTREAM_TOKEN)}

[tenants.by-key]
key_sha256 = {q(_key_digest(spillway_bin, KEY))}

[tenants.by-cert]
client_cert_sha256 = [{q(fingerprint)}]
"""
        )
        gateway = Process(
            "spillway-tls",
            [str(spillway_bin), "serve", "--config", str(REPO / "config/demo.toml"), "--config", str(config)],
            tmp_path,
        )
        cleanup.callback(gateway.stop)
        url = f"https://127.0.0.1:{port}"
        stack = TlsStack(url=url, ca=ca_path, client_cert=client_cert, log=gateway)

        def healthy() -> Optional[str]:
            try:
                opener = urllib.request.build_opener(
                    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=stack.context())
                )
                with opener.open(f"{url}/healthz", timeout=2) as resp:
                    return url if resp.status == 200 else None
            except OSError:
                return None

        gateway.wait_for("answer on GET /healthz over HTTPS", healthy)
        yield stack


def test_the_sdk_sends_messages_over_https(tls_stack: TlsStack) -> None:
    client = tls_stack.sdk(KEY)
    message = client.messages.create(
        model=HAIKU, max_tokens=32, messages=[{"role": "user", "content": "Hello over TLS"}]
    )
    assert message.type == "message"
    assert message.content and message.content[0].type == "text"
    with client.messages.stream(
        model=HAIKU, max_tokens=32, messages=[{"role": "user", "content": "Stream over TLS"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts), "the stream carried text"
    assert final.usage.output_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        tls_stack.sdk("sk-spw-not-a-tenant").messages.create(
            model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )


def test_a_client_certificate_is_a_tenant_without_a_key(tls_stack: TlsStack) -> None:
    # The SDK insists on some key; with a mapped certificate it is not one.
    client = tls_stack.sdk("placeholder-not-a-key", with_client_cert=True)
    message = client.messages.create(
        model=HAIKU, max_tokens=16, messages=[{"role": "user", "content": "Who am I?"}]
    )
    assert message.type == "message"
    series = f'spillway_requests_total{{model="{HAIKU}",outcome="ok",tenant="by-cert"}} 1'
    metrics = tls_stack.metrics()
    assert series in metrics.splitlines(), metrics


def test_an_sdk_that_does_not_trust_the_gateway_cannot_connect(tls_stack: TlsStack) -> None:
    http = anthropic.DefaultHttpxClient(verify=ssl.create_default_context(), trust_env=False)
    client = Anthropic(api_key=KEY, base_url=tls_stack.url, http_client=http, max_retries=0)
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
