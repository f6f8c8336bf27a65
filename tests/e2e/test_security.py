"""Bearer tokens, TLS and mutual TLS, the concurrency limit, metrics and logs, on real servers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.api.config import ServerConfig
from service.api.logs import JsonFormatter
from service.api.server import create_server, load_tokens
from service.client import NextWordClient
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.e2e.test_server import held_session, start

TOKEN = "s3cret-token-0123456789"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(item) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger CA."""
    root = tmp_path_factory.mktemp("pki")
    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("nextword test CA", ca_key, _name("nextword test CA"), ca_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("another CA", other_key, _name("another CA"), other_key, ca=True)
    for name, is_server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}.key"] = _pem(key)
        files[f"{name}.crt"] = _pem(_certificate(name, key, ca.subject, ca_key, ca=False, server=is_server))
    files["ca.crt"], files["other-ca.crt"] = _pem(ca), _pem(other)
    paths = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        paths[name] = str(root / name)
    return paths, files


@pytest.fixture(scope="module")
def secured(tiny_char_model, pki, tmp_path_factory):
    paths, _ = pki
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# one token per line\n{TOKEN}\n")
    server, port, _ = start(
        tiny_char_model, tls_cert=paths["server.crt"], tls_key=paths["server.key"], auth_token_file=str(tokens)
    )
    yield server, port
    server.stop(0)


def test_without_a_valid_token_calls_are_unauthenticated_but_health_answers(secured, pki):
    _, files = pki
    port = secured[1]
    for token in (None, "wrong-token-0123456789"):
        with NextWordClient(f"localhost:{port}", timeout=10, token=token, root_certificates=files["ca.crt"]) as c:
            with pytest.raises(grpc.RpcError) as caught:
                c.suggest("we")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                list(c.type([pb.TypeRequest(append="we")]))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"
    with NextWordClient(f"localhost:{port}", timeout=10, token=TOKEN, root_certificates=files["ca.crt"]) as c:
        assert c.suggest("we ").suggestions
        assert c.info().tokenizer == "char"


def test_tls_client_that_does_not_trust_the_server_cannot_connect(secured, pki):
    _, files = pki
    port = secured[1]
    for client in (
        NextWordClient(f"localhost:{port}", timeout=5, token=TOKEN, root_certificates=files["other-ca.crt"]),
        NextWordClient(f"localhost:{port}", timeout=5, token=TOKEN),
    ):  # plaintext to a TLS port
        with client, pytest.raises(grpc.RpcError) as caught:
            client.stub.Suggest(pb.SuggestRequest(text="we"), timeout=5, metadata=client.metadata)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(tiny_char_model, pki):
    paths, files = pki
    server, port, _ = start(
        tiny_char_model, tls_cert=paths["server.crt"], tls_key=paths["server.key"], tls_client_ca=paths["ca.crt"]
    )
    try:
        with (
            NextWordClient(f"localhost:{port}", timeout=5, root_certificates=files["ca.crt"]) as anonymous,
            pytest.raises(grpc.RpcError) as caught,
        ):
            anonymous.stub.Suggest(pb.SuggestRequest(text="we"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with NextWordClient(
            f"localhost:{port}",
            timeout=10,
            root_certificates=files["ca.crt"],
            private_key=files["client.key"],
            certificate_chain=files["client.crt"],
        ) as known:
            assert known.suggest("we ").suggestions
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tls_cert": "/nonexistent/server.crt", "tls_key": "/nonexistent/server.key"}, "cannot read --tls-key"),
        ({"tls_cert": "x.crt"}, "TLS needs both --tls-cert and --tls-key"),
        ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"auth_token_file": "/nonexistent/tokens"}, "cannot read --auth-token-file /nonexistent/tokens"),
    ],
)
def test_security_settings_errors_name_the_problem(tiny_char_model, overrides, message):
    from service.model.engine import Engine

    config = ServerConfig(model=tiny_char_model, host="127.0.0.1", port=0, metrics_port=0, **overrides)
    with pytest.raises(ValueError, match=message):
        create_server(config, Engine.load(config))


def test_tokens_come_from_the_file_and_the_environment_and_must_be_long(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    lines = ["# comment", "", "first-token-0123456789", "second-token-0123456789 alice,bob", "third-token-0123456789 *"]
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("NEXTWORD_AUTH_TOKEN", "fourth-token-0123456789")
    grants = load_tokens(ServerConfig(auth_token_file=str(path)))
    assert [g.token for g in grants] == [
        "first-token-0123456789",
        "second-token-0123456789",
        "third-token-0123456789",
        "fourth-token-0123456789",
    ]
    assert [(g.allows("alice"), g.allows("carol")) for g in grants] == [
        (False, False),
        (True, False),
        (True, True),
        (False, False),
    ]
    path.write_text("first-token-0123456789 alice,not a user\n")
    with pytest.raises(ValueError, match="not a user id"):
        load_tokens(ServerConfig(auth_token_file=str(path)))
    monkeypatch.setenv("NEXTWORD_AUTH_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_tokens(ServerConfig())
    path.write_text("# nothing\n")
    monkeypatch.delenv("NEXTWORD_AUTH_TOKEN")
    with pytest.raises(ValueError, match="has no token"):
        load_tokens(ServerConfig(auth_token_file=str(path)))


def test_concurrency_limit_refuses_with_resource_exhausted_naming_the_limit(tiny_char_model):
    server, port, _ = start(tiny_char_model, max_concurrent_rpcs=2, max_sessions=8)
    release = threading.Event()

    try:
        with NextWordClient(f"127.0.0.1:{port}", timeout=20) as client:
            streams = [client.type(held_session(release, 20)) for _ in range(2)]
            for stream in streams:
                next(stream)  # both sessions are open and hold a slot each
            with pytest.raises(grpc.RpcError) as caught:
                client.suggest("we")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the limit is 2 (server setting max_concurrent_rpcs)" in caught.value.details()
            assert client.health() == "SERVING"  # health checks are not counted
            release.set()
            for stream in streams:
                list(stream)
            assert client.suggest("we ").suggestions
    finally:
        release.set()
        server.stop(0)


def test_the_client_retries_a_refused_call_with_backoff_and_a_plain_one_fails_at_once(tiny_char_model):
    server, port, _ = start(tiny_char_model, max_concurrent_rpcs=1, max_sessions=8)
    release = threading.Event()

    def refused() -> float:
        value = server.metrics.registry.get_sample_value(
            "nextword_requests_total",
            {"method": "Suggest", "code": "RESOURCE_EXHAUSTED", "model": "", "protocol": "grpc"},
        )
        return value or 0.0

    try:
        with NextWordClient(f"127.0.0.1:{port}", timeout=20) as client:
            session = client.type(held_session(release, 20))
            next(session)  # the one place is taken
            with NextWordClient(f"127.0.0.1:{port}", timeout=20, retry=False) as plain:
                with pytest.raises(grpc.RpcError) as caught:
                    plain.suggest("we ")
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused() == 1
            answer = {}
            waiting = threading.Thread(target=lambda: answer.setdefault("it", client.suggest("we ")))
            waiting.start()
            deadline = time.time() + 10
            while refused() < 2 and time.time() < deadline:  # its first try was refused
                time.sleep(0.001)
            assert refused() >= 2
            release.set()  # the session ends and frees the place; a later try gets in
            list(session)
            waiting.join(20)
            assert answer["it"].suggestions
    finally:
        release.set()
        server.stop(0)


def test_metrics_endpoint_counts_calls_by_status_and_reports_the_model(tiny_char_model):
    server, port, _ = start(tiny_char_model)
    try:
        with NextWordClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.suggest("we ")
            client.suggest("we ")
            with pytest.raises(grpc.RpcError):
                client.suggest("")
            list(client.type([pb.TypeRequest(append="w"), pb.TypeRequest(append="e")]))
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        name = server.engine.name
        assert f'nextword_requests_total{{code="OK",method="Suggest",model="{name}",protocol="grpc"}} 2.0' in text
        assert (
            f'nextword_requests_total{{code="INVALID_ARGUMENT",method="Suggest",model="{name}",protocol="grpc"}} 1.0'
            in text
        )
        assert f'nextword_requests_total{{code="OK",method="Type",model="{name}",protocol="grpc"}} 1.0' in text
        assert 'nextword_request_seconds_bucket{le="+Inf",method="Suggest",protocol="grpc"} 3.0' in text
        assert f'nextword_batch_rows_count{{model="{name}"}}' in text
        assert f'nextword_queue_depth{{model="{name}"}}' in text
        assert "nextword_active_sessions 0.0" in text
        assert 'nextword_model_info{cell="lstm"' in text and 'tokenizer="char"' in text and f'name="{name}"' in text
    finally:
        server.stop(0)


def test_log_lines_are_json_with_a_request_id_and_never_the_typed_text(tiny_char_model, caplog):
    server, port, _ = start(tiny_char_model)
    secret = "my password is hunter2"
    try:
        with caplog.at_level(logging.INFO, logger="nextword"), NextWordClient(f"127.0.0.1:{port}") as client:
            response, call = client.stub.Suggest.with_call(
                pb.SuggestRequest(text=secret), metadata=(("x-request-id", "abc-123"),)
            )
            assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"
            list(client.type([pb.TypeRequest(append=secret)]))
            with pytest.raises(grpc.RpcError):
                client.suggest("x" * 20000)
    finally:
        server.stop(0)
    lines = [JsonFormatter().format(record) for record in caplog.records]
    entries = [json.loads(line) for line in lines]
    calls = [e for e in entries if e["message"] == "call"]
    assert {"request_id": "abc-123", "method": "Suggest", "code": "OK"}.items() <= calls[0].items()
    assert {e["method"] for e in calls} == {"Suggest", "Type"}
    assert all(len(e["request_id"]) >= 6 and "ms" in e for e in calls)
    assert not any("hunter2" in line or "xxxxxxxx" in line for line in lines)


def test_no_log_calls_keeps_calls_out_of_the_log_but_not_errors(tiny_char_model, caplog, monkeypatch):
    server, port, engine = start(tiny_char_model, log_calls=False)
    monkeypatch.setattr(engine.suggester, "suggest", lambda text, k: 1 / 0)
    try:
        with caplog.at_level(logging.INFO, logger="nextword"), NextWordClient(f"127.0.0.1:{port}") as client:
            client.stub.GetModelInfo(pb.GetModelInfoRequest())
            with pytest.raises(grpc.RpcError) as failed:
                client.suggest("we")
    finally:
        server.stop(0)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    messages = [record.getMessage() for record in caplog.records if record.name == "nextword"]
    assert "call" not in messages and "internal error" in messages


ALICE = "token-for-alice-0123456789"
NOBODY = "token-for-nobody-0123456789"
# one small valid request for each method of nextword.v1.NextWord (a new method must be added here)
METHODS = {
    "Suggest": lambda stub, md: stub.Suggest(pb.SuggestRequest(text="we "), timeout=30, metadata=md),
    "Generate": lambda stub, md: list(
        stub.Generate(pb.GenerateRequest(prompt="we", max_tokens=2), timeout=30, metadata=md)
    ),
    "Type": lambda stub, md: list(stub.Type(iter([pb.TypeRequest(append="we")]), timeout=30, metadata=md)),
    "Convert": lambda stub, md: stub.Convert(pb.ConvertRequest(pinyin="ni"), timeout=30, metadata=md),
    "GetModelInfo": lambda stub, md: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=md),
    "Learn": lambda stub, md: stub.Learn(pb.LearnRequest(text="hello there"), timeout=30, metadata=md),
    "Forget": lambda stub, md: stub.Forget(pb.ForgetRequest(word="hello"), timeout=30, metadata=md),
    "ExportHistory": lambda stub, md: list(stub.ExportHistory(pb.ExportHistoryRequest(), timeout=30, metadata=md)),
    "ImportHistory": lambda stub, md: stub.ImportHistory(
        iter([pb.HistoryChunk(lines='{"ngram": ["hi"], "count": 1, "last_used": 1}\n')]), timeout=30, metadata=md
    ),
}


def test_the_method_table_covers_the_service():
    assert set(METHODS) == set(pb.DESCRIPTOR.services_by_name["NextWord"].methods_by_name)


@pytest.fixture(scope="module")
def bound(tiny_char_model, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{ALICE} alice\n{NOBODY}\n")
    server, port, _ = start(tiny_char_model, auth_token_file=str(tokens))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.NextWordStub(channel)
    channel.close()
    server.stop(0)


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", sorted(METHODS))
def test_token_binding_holds_on_every_method(bound, method):
    call = METHODS[method]
    alice = (("authorization", f"Bearer {ALICE}"),)
    assert code_of(lambda: call(bound, ())) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(bound, (("authorization", "Bearer wrong-token-0123456789"),))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    for other in (
        alice + (("x-nextword-user", "bob"),),
        (("authorization", f"Bearer {NOBODY}"), ("x-nextword-user", "alice")),
    ):
        assert code_of(lambda other=other: call(bound, other)) == grpc.StatusCode.PERMISSION_DENIED
    allowed = code_of(lambda: call(bound, alice + (("x-nextword-user", "alice"),)))
    assert allowed not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL)
