"""What URLs look like once they leave the process: no credentials, no query strings."""

from __future__ import annotations

import base64
import logging

import pytest

from actors.redact import display_url, install_log_redaction, redact_text, secrets_in_url

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # a token as the user name (GitHub, GitLab, many CDNs): the whole userinfo goes
        ("https://ghp_TOKEN@host/a.mp4", "https://***@host/a.mp4"),
        # a password holding '@': userinfo runs to the authority's LAST '@'
        ("https://user:p@ss@host/x", "https://***@host/x"),
        ("https://user:p@ss@w@rd@host:8443/x?y=1", "https://***@host:8443/x?[redacted]"),
        # a quote inside a query string is part of it
        ('https://h/a.mp4?sig=a"b&c=d', "https://h/a.mp4?[redacted]"),
        ("https://h/a.mp4?sig=a'b&c=d", "https://h/a.mp4?[redacted]"),
        # what was already redacted before
        ("https://user:pass@host/a.mp4?X-Amz-Signature=abc#t=10", "https://***@host/a.mp4?[redacted]#t=10"),
        ("https://TOKEN:x-oauth-basic@host/a.mp4", "https://***@host/a.mp4"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        # '@' after the authority is no userinfo; nothing to hide
        ("https://host/people/@me/a.mp4", "https://host/people/@me/a.mp4"),
        ("https://host/a.mp4", "https://host/a.mp4"),
    ],
)
def test_display_url_hides_every_userinfo_and_query(url: str, shown: str) -> None:
    assert display_url(url) == shown
    assert display_url(shown) == shown  # idempotent: a log line that later reaches Sentry


def test_text_around_urls_is_kept_and_queries_end_at_whitespace_or_fragment() -> None:
    text = 'task 1, file "v.mp4" from https://tok@cdn/v.mp4?sig=a"b c=d failed; see https://u:pw@x/y#z'
    assert redact_text(text) == (
        'task 1, file "v.mp4" from https://***@cdn/v.mp4?[redacted] c=d failed; see https://***@x/y#z'
    )


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    previous = logging.getLogRecordFactory()
    install_log_redaction(["s3cr3t-value"])
    try:
        with caplog.at_level(logging.INFO, logger="haul.test"):
            logging.getLogger("haul.test").info("fetching %s with s3cr3t-value", 'https://ghp_TOKEN@h/a?sig=x"y')
    finally:
        logging.setLogRecordFactory(previous)
    assert caplog.messages == ["fetching https://***@h/a?[redacted] with [redacted]"]


def test_a_urls_own_secrets_include_basic_credentials_raw_query_values_and_long_path_segments() -> None:
    url = "https://hook-user:pw%40567@hooks.example.com/services/T0001/B0002/abcdefghijkl1234?token=ab%2Bcd&x=y"
    found = secrets_in_url(url)
    basic = base64.b64encode(b"hook-user:pw@567").decode()  # what requests sends as Authorization
    assert {"hook-user", "pw%40567", basic, "ab+cd", "ab%2Bcd", "abcdefghijkl1234"} <= set(found)
    echoed = f"401: got Authorization: Basic {basic} for /services/T0001/B0002/abcdefghijkl1234 token=ab%2Bcd"
    shown = "401: got Authorization: Basic [redacted] for /services/T0001/B0002/[redacted] token=[redacted]"
    assert redact_text(echoed, found) == shown
