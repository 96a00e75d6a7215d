"""OAuth 2 / OIDC bearer tokens through HTTP: tokens minted by PyJWT with
keys made by `cryptography`, verified by a real server against a JWKS file
and against a JWKS URL served here by http.server (a key rotation is seen
after the refresh; over HTTPS from a private CA with --outbound-ca-file); API keys keep working beside tokens; a token's subject
owns its jobs; refusals are 401s that say why (403 for a valid token
without the scope), never quoting the token. test_server_jwt.c covers the
verifier's cases one by one."""
import base64
import hmac
import http.server
import json
import os
import tempfile
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import Server, image_bytes, pki, problem, tls_listening, wait_job  # noqa: F401 (pki: a fixture)

ISSUER = "https://idp.example/realms/sdx4"
AUDIENCE = "sdx4-api"
UNKNOWN_JOB = "/api/v1/jobs/" + "f" * 32  # 404 once authenticated, 401/403 before


class Key:
    def __init__(self, alg, kid):
        self.alg, self.kid = alg, kid
        if alg == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=kid, use="sig")

    def token(self, sub="alice", scope="upscale", **claims):
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300, "scope": scope}
        body.update(claims)
        if scope is None:
            del body["scope"]
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


RSA, EC, ED = Key("RS256", "rsa-1"), Key("ES256", "ec-1"), Key("EdDSA", "ed-1")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token):
    return {"Authorization": "Bearer " + token}


def jwks(*keys):
    return {"keys": [k.jwk for k in keys]}


def token_flags(source, *more):
    return ("--jwt-jwks", source, "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, *more)


@pytest.fixture(scope="module")
def jwks_file():
    fd, path = tempfile.mkstemp(prefix="sdx4-jwks-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(jwks(RSA, EC, ED), f)
    yield path
    os.unlink(path)


@pytest.fixture(scope="module")
def tokens(jwks_file):
    """Tokens from a JWKS file, and an API key beside them."""
    s = Server(*token_flags(jwks_file), "--api-keys", "key-carol", "--auth-failures", "0", "--log-level", "debug")
    yield s
    s.check_clean_exit()


class JwksServer(http.server.ThreadingHTTPServer):
    """An IdP's jwks_uri on a loopback port; `doc` may be replaced. With
    `pki` (conftest's), over HTTPS with a certificate of its test CA."""

    def __init__(self, doc, pki=None):
        self.doc, self.fetches = doc, 0
        super().__init__(("127.0.0.1", 0), JwksHandler)
        self.scheme = "https" if pki else "http"
        if pki:
            tls_listening(self, pki)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/protocol/openid-connect/certs"


class JwksHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(self.server.doc).encode()
        self.server.fetches += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_each_algorithm(tokens):
    for key in (RSA, EC, ED):  # (test_subjects_keep_their_jobs upscales with tokens)
        problem(tokens.get(UNKNOWN_JOB, headers=bearer(key.token())), 404, "not-found")


def test_api_keys_beside_tokens(tokens):
    problem(tokens.get(UNKNOWN_JOB, headers=bearer("key-carol")), 404, "not-found")
    problem(tokens.get(UNKNOWN_JOB, headers={"X-API-Key": "key-carol"}), 404, "not-found")
    problem(tokens.get(UNKNOWN_JOB, headers=bearer("key-dave")), 403, "forbidden")
    problem(tokens.get(UNKNOWN_JOB), 401, "unauthorized")


def refused(s, token, reason):
    r = s.get(UNKNOWN_JOB, headers=bearer(token))
    p = problem(r, 401, "unauthorized")
    assert p["detail"] == "the bearer token was refused: " + reason, p
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert token not in r.text and all(part not in r.text for part in token.split(".") if len(part) > 8)


def test_refusals_say_why(tokens):
    now = int(time.time())
    refused(tokens, RSA.token(exp=now - 3600), "expired")
    refused(tokens, EC.token(nbf=now + 3600), "not yet valid")
    refused(tokens, ED.token(iss="https://evil.example"), "wrong issuer")
    refused(tokens, ED.token(aud="another-api"), "wrong audience")
    refused(tokens, ED.token(aud=["another-api", "x"]), "wrong audience")
    refused(tokens, Key("ES256", "ec-unknown").token(), "unknown key")
    impostor = Key("RS256", "rsa-1")  # our kid, another key
    refused(tokens, impostor.token(), "bad signature")
    refused(tokens, jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60}, None,
                               algorithm="none"), "algorithm not allowed")
    # algorithm confusion: HS256 keyed with the RSA public key's PEM
    pem = RSA.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    signed = b64url(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()) + "." + b64url(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60, "scope": "upscale"}).encode())
    forged = signed + "." + b64url(hmac.new(pem, signed.encode(), "sha256").digest())
    refused(tokens, forged, "algorithm not allowed")
    # an ES256 token naming the RSA key
    mismatched = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60}, EC.private,
                            algorithm="ES256", headers={"kid": "rsa-1"})
    refused(tokens, mismatched, "algorithm does not fit the key")
    refused(tokens, "eyJhbGciOiJSUzI1NiJ9.e30", "malformed token")
    refused(tokens, RSA.token() + "=", "malformed token")
    refused(tokens, "eyJ" + "A" * 9000 + ".x.y", "malformed token")
    # the log has each refusal at debug level, with the reason and never the token
    logged = [l for l in tokens.logs() if isinstance(l, dict) and l.get("event") == "token_refused"]
    assert {"expired", "wrong audience", "algorithm not allowed"} <= {l["reason"] for l in logged}
    assert all(l["level"] == "debug" and "eyJ" not in json.dumps(l) for l in logged)


def test_scope(tokens):
    r = tokens.get(UNKNOWN_JOB, headers=bearer(RSA.token(scope="admin")))
    assert problem(r, 403, "forbidden")["detail"] == "the credential lacks the upscale scope"
    problem(tokens.get(UNKNOWN_JOB, headers=bearer(RSA.token(scope="openid profile"))), 403, "forbidden")
    problem(tokens.get(UNKNOWN_JOB, headers=bearer(RSA.token(scope=None, scp=["upscale"]))), 404, "not-found")
    # the admin API (test_admin.py): a token's admin scope opens it, the upscale scope does not
    assert tokens.get("/api/v1/admin/jobs", headers=bearer(RSA.token(scope="admin"))).status_code == 200
    r = tokens.get("/api/v1/admin/jobs", headers=bearer(RSA.token(scope="upscale")))
    assert "no admin scope" in problem(r, 403, "forbidden")["detail"]


def test_subjects_keep_their_jobs(tokens):
    alice, alice_again, bob = bearer(RSA.token("alice")), bearer(ED.token("alice")), bearer(EC.token("bob"))
    r = tokens.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"}, headers=alice)
    assert r.status_code == 202, r.text
    job = r.json()
    assert wait_job(tokens, job["id"], headers=alice)["status"] == "succeeded"
    # another token of the same subject (another key, another algorithm) is alice
    assert tokens.get(job["links"]["result"], headers=alice_again).status_code == 200
    # bob, and carol's API key, get the 404 of an unknown id
    for other in (bob, {"X-API-Key": "key-carol"}):
        problem(tokens.get(job["links"]["self"], headers=other), 404, "not-found")
        problem(tokens.get(job["links"]["result"], headers=other), 404, "not-found")
        problem(tokens.delete(job["links"]["self"], headers=other), 404, "not-found")
    assert tokens.get(job["links"]["self"], headers=alice).json()["status"] == "succeeded"


def test_jwks_url_and_rotation():
    idp = JwksServer(jwks(RSA, EC))
    s = Server(*token_flags(idp.url, "--jwt-jwks-refresh", "1"), "--auth-failures", "0")
    try:
        problem(s.get(UNKNOWN_JOB, headers=bearer(EC.token())), 404, "not-found")
        rotated = Key("EdDSA", "ed-rotated")
        refused(s, rotated.token(), "unknown key")
        idp.doc = jwks(rotated)  # the IdP rotates: the old keys are gone
        deadline = time.time() + 10
        while s.get(UNKNOWN_JOB, headers=bearer(rotated.token())).status_code != 404:
            assert time.time() < deadline, "the rotated key was never fetched"
            time.sleep(0.1)
        refused(s, EC.token(), "unknown key")
        # the IdP goes away: the keys fetched last stay in use
        idp.shutdown()
        idp.server_close()
        time.sleep(1.2)
        problem(s.get(UNKNOWN_JOB, headers=bearer(rotated.token())), 404, "not-found")
        assert any(isinstance(l, dict) and l.get("event") == "jwks_refresh_failed" for l in s.logs())
    finally:
        s.check_clean_exit()


def test_jwks_url_behind_a_private_ca(pki):
    """An IdP whose certificate a private CA signed: libcurl's default CAs
    (the system's) refuse it, so the server does not start and says why;
    with --outbound-ca-file naming that CA the keys are fetched over HTTPS."""
    idp = JwksServer(jwks(RSA), pki)
    try:
        assert "certificate" in start_fails(*token_flags(idp.url))
        s = Server(*token_flags(idp.url, "--outbound-ca-file", pki["ca.pem"]), "--auth-failures", "0")
        try:
            problem(s.get(UNKNOWN_JOB, headers=bearer(RSA.token())), 404, "not-found")
            assert idp.fetches == 1
        finally:
            s.check_clean_exit()
    finally:
        idp.shutdown()
        idp.server_close()


def start_fails(*flags):
    with pytest.raises(RuntimeError) as e:
        Server(*flags)
    return str(e.value)


def test_bad_settings_refuse_to_start(jwks_file):
    idp = JwksServer(jwks(RSA))
    port = idp.server_address[1]
    idp.shutdown()
    idp.server_close()
    assert "jwt-jwks" in start_fails(*token_flags(f"http://127.0.0.1:{port}/certs"))
    assert "loopback" in start_fails(*token_flags("http://idp.example/certs"))
    assert "jwt-jwks needs jwt-issuer" in start_fails("--jwt-jwks", jwks_file, "--jwt-audience", AUDIENCE)
    # (a JWKS without a usable key, and the other ways a key set is refused: test_server_jwt.c)
