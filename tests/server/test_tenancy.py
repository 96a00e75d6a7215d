"""Tenants kept apart: the rate limit applies to the real client behind a
trusted proxy however many X-Forwarded-For lines a request carries."""
import http.client

from conftest import Server


def post_with_forwarded(s, *lines):
    """A cheap upscale request (refused after the rate limit is checked) with
    one X-Forwarded-For header line per item of `lines`; its status."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        body = b'{"image": "x"}'
        conn.putrequest("POST", "/api/v1/upscale")
        for line in lines:
            conn.putheader("X-Forwarded-For", line)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_rate_limit_reads_every_forwarded_for_line():
    s = Server("--trusted-proxies", "127.0.0.1/32", "--rate-limit", "2")
    try:
        # a client forges a first line; the trusted proxy appends the real
        # address in a second one: the limit counts the real client
        statuses = [post_with_forwarded(s, f"198.51.100.{i}", "203.0.113.9") for i in range(3)]
        assert 429 not in statuses[:2] and statuses[2] == 429, statuses
        assert post_with_forwarded(s, "198.51.100.77, 203.0.113.9") == 429
        # another real client is not affected, whatever it forged left of
        # the address the proxy saw
        assert post_with_forwarded(s, "198.51.100.5", "garbage", "203.0.113.10") != 429
        # an entry that is not an address stops the walk at the hop to its
        # right: here the proxy itself, so a client cannot pick its name
        # by sending garbage; the proxy's own allowance is spent first
        assert 429 not in [post_with_forwarded(s) for _ in range(2)]
        assert post_with_forwarded(s) == 429
        assert post_with_forwarded(s, "203.0.113.12", "unknown") == 429
        assert post_with_forwarded(s, "203.0.113.12, [::1]:80") == 429
        assert post_with_forwarded(s, "203.0.113.12,") == 429
    finally:
        s.check_clean_exit()
