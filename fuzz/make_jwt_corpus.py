#!/usr/bin/env python3
"""Writes fuzz_jwt's key set (fuzz/fuzz_jwt_keys.h: the public JWKS) and its
seeds (fuzz/corpus/fuzz_jwt/): tokens signed by the private halves, which
are thrown away, valid at fuzz_jwt.c's fixed time; claims; JWKS documents.
Needs PyJWT and cryptography (tests/server/requirements.txt):
    /tmp/venv/bin/python fuzz/make_jwt_corpus.py
Rerun only to change the seeds: the header and the seeds go together."""
import base64
import hmac
import json
import os

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

HERE = os.path.dirname(os.path.abspath(__file__))
ISSUER, AUDIENCE = "https://idp.example/realms/sdx4", "sdx4-api"
IAT, EXP = 1700000000, 2000000000  # around fuzz_jwt.c's NOW (1800000000)

keys = [("RS256", "rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048), jwt.algorithms.RSAAlgorithm),
        ("ES256", "ec-1", ec.generate_private_key(ec.SECP256R1()), jwt.algorithms.ECAlgorithm),
        ("EdDSA", "ed-1", ed25519.Ed25519PrivateKey.generate(), jwt.algorithms.OKPAlgorithm)]
jwks = {"keys": []}
for alg, kid, private, algorithm in keys:
    jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid=kid, use="sig")
    jwks["keys"].append(jwk)
jwks_text = json.dumps(jwks, separators=(",", ":"))
with open(os.path.join(HERE, "fuzz_jwt_keys.h"), "w") as f:
    f.write("/* fuzz_jwt's key set; written by fuzz/make_jwt_corpus.py with the seeds it signs */\n")
    f.write("#define FUZZ_JWT_JWKS " + json.dumps(jwks_text) + "\n")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


claims = [
    {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": IAT, "exp": EXP, "scope": "openid upscale"},
    {"iss": ISSUER, "aud": [AUDIENCE, "other"], "sub": "bob", "nbf": IAT, "exp": EXP, "scp": ["admin", "upscale"]},
    {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "exp": EXP + 0.5, "scp": "admin"},
]
seeds = []
for alg, kid, private, _ in keys:
    for i, c in enumerate(claims):
        headers = {"kid": kid} if i < 2 else None  # the last without kid
        seeds.append(b"\0" + jwt.encode(c, private, algorithm=alg, headers=headers).encode())
signed = b64url(b'{"alg":"HS256","kid":"rsa-1"}') + "." + b64url(json.dumps(claims[0]).encode())
seeds.append(b"\0" + (signed + "." + b64url(hmac.new(b"secret", signed.encode(), "sha256").digest())).encode())
seeds.append(b"\0" + (b64url(b'{"alg":"none"}') + "." + b64url(json.dumps(claims[0]).encode()) + ".").encode())
seeds += [b"\1" + json.dumps(c).encode() for c in claims]
seeds.append(b"\2" + jwks_text.encode())
seeds.append(b"\2" + json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "EC", "crv": "P-384"},
                                           jwks["keys"][2]]}).encode())
out = os.path.join(HERE, "corpus", "fuzz_jwt")
os.makedirs(out, exist_ok=True)
for name in os.listdir(out):
    os.unlink(os.path.join(out, name))
for i, seed in enumerate(seeds):
    with open(os.path.join(out, f"seed-{i:02d}"), "wb") as f:
        f.write(seed)
