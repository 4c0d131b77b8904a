"""The secret rule (study.urls) over a table of URL shapes: no secret survives masking, scrubbing or the
form kept in files, whatever the URL looks like, and what is not secret stays readable."""
from __future__ import annotations

import re

import pytest

from study import urls
from study.driver.checks import masked, runtime_url, without_password
from study.cli import UsageError

PW = "Zq7xW"   # never a substring of the rest of any URL below

# (url, what masking shows, what a file keeps (None: refused), the secrets it holds)
CASES = [
    ("sqlite:///optuna.db", "sqlite:///optuna.db", "sqlite:///optuna.db", []),
    ("sqlite:////abs/path/optuna.db", "sqlite:////abs/path/optuna.db", "sqlite:////abs/path/optuna.db", []),
    (f"postgresql://user:{PW}@db.example:5432/studies?sslmode=require",
     "postgresql://user:***@db.example:5432/studies?sslmode=require",
     "postgresql://user@db.example:5432/studies?sslmode=require", [PW]),
    (f"postgresql+psycopg://u:{PW}@h/db", "postgresql+psycopg://u:***@h/db", "postgresql+psycopg://u@h/db", [PW]),
    (f"postgresql://u@host/db?password={PW}", "postgresql://u@host/db?password=***", "postgresql://u@host/db", [PW]),
    (f"postgresql://u@h/db?sslmode=require&sslpassword={PW}&application_name=x",
     "postgresql://u@h/db?sslmode=require&sslpassword=***&application_name=x",
     "postgresql://u@h/db?sslmode=require&application_name=x", [PW]),
    (f"mysql://u@h/db?PassWd={PW}", "mysql://u@h/db?PassWd=***", "mysql://u@h/db", [PW]),
    (f"mysql://u@h/db?pwd={PW};token=t0k3nQ", "mysql://u@h/db?pwd=***;token=***", "mysql://u@h/db",
     [PW, "t0k3nQ"]),
    (f"s3://AKIAX:{PW}@bucket/prefix", "s3://AKIAX:***@bucket/prefix", "s3://AKIAX@bucket/prefix", [PW]),
    (f"s3://bucket/p?access_key=AKIAX&secret_key={PW}&region=us-east-1",
     "s3://bucket/p?access_key=***&secret_key=***&region=us-east-1", "s3://bucket/p?region=us-east-1",
     [PW, "AKIAX"]),
    (f"s3://b/x?AWS_SECRET_ACCESS_KEY={PW}&X-Amz-Signature=s1gQ&session_token=t0kQ",
     "s3://b/x?AWS_SECRET_ACCESS_KEY=***&X-Amz-Signature=***&session_token=***", "s3://b/x",
     [PW, "s1gQ", "t0kQ"]),
    # an unencoded '@' (and ':') in the password: hidden whole, and refused for files (clients split it differently)
    (f"postgresql://user:p@ss:{PW}@host/db", "postgresql://user:***@host/db", None, [f"p@ss:{PW}"]),
    (f"postgresql://u:12/{PW}@host/db", "postgresql://u:***@host/db", None, [f"12/{PW}"]),
    (f"postgresql://u:{PW}@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db", "postgresql://u@[::1]:5432/db", [PW]),
    ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db", []),
    (f"postgresql://u:{PW}%40x@h/db", "postgresql://u:***@h/db", "postgresql://u@h/db", [f"{PW}%40x", f"{PW}@x"]),
    (f"postgresql://u:{PW}@host/db?email=a@b.org", "postgresql://u:***@host/db?email=a@b.org",
     "postgresql://u@host/db?email=a@b.org", [PW]),
    # unreadable: never shown at all (only the scheme)
    (f"postgresql://u:{PW}@host:99x/db", "postgresql://<unreadable URL, not shown>", None, None),
    (f"postgresql://u:{PW}@[::1/db", "postgresql://<unreadable URL, not shown>", None, None),
    (f"postgresql://u:{PW}@h/d\nb", "postgresql://<unreadable URL, not shown>", None, None),
    # no scheme: the user-info and key=value secrets still hidden; plain paths untouched
    (f"u:{PW}@host/db", "u:***@host/db", None, [PW]),
    (f"host=h password={PW} dbname=x", "host=h password=*** dbname=x", None, [PW]),
    ("/data/studies", "/data/studies", None, []),
    ("garbage", "garbage", None, []),
]


@pytest.mark.parametrize("url, shown, kept, secrets", CASES, ids=[f"{i}-{c[1][:30]}" for i, c in enumerate(CASES)])
def test_every_shape_is_masked_for_messages_and_stripped_for_files(url, shown, kept, secrets):
    assert urls.masked(url) == shown
    assert PW not in urls.masked(url)
    if secrets is not None:
        assert set(urls.secrets_in(url)) >= set(secrets)
    if urls.is_url(url):
        if kept is None:
            with pytest.raises(urls.UrlError):
                urls.without_secrets(url)
        else:
            assert urls.without_secrets(url) == kept and PW not in kept
    # A library's message quoting the URL, or its secrets alone, comes out clean.
    message = f"could not connect to {url}" + "".join(f" (password {s!r} rejected)" for s in secrets or [])
    clean = urls.scrub(message, url)
    assert PW not in clean and not any(s in clean for s in secrets or [])


@pytest.mark.parametrize("text", [PW, f"u:{PW}@host/db", "garbage", f"{PW}@", "", "/a/b"])
def test_a_value_that_should_be_a_url_and_is_not_is_not_shown(text):
    assert urls.masked_url(text) == "<not a URL, not shown>"


def test_text_holding_urls_has_each_masked():
    text = f"--optuna-storage=postgresql://u:{PW}@h/db and s3://k:{PW}@b/x"
    assert urls.masked(text) == "--optuna-storage=postgresql://u:***@h/db and s3://k:***@b/x"
    assert PW in urls.secrets_in(text)


def test_names_holding_secret_words_are_secret_and_others_are_not():
    for name in ("password", "PASSWORD", "passwd", "pwd", "token", "secret", "key", "access_key", "sslpassword",
                 "aws_secret_access_key", "Secret-Key", "api%5Fkey", "id_token", "client_secret", "sig" + "nature"):
        assert urls.masked(f"x://h/p?{name}=v1") == f"x://h/p?{name}=***", name
    for name in ("sslmode", "region", "scheme", "endpoint_override", "application_name", "user", "dbname"):
        assert urls.masked(f"x://h/p?{name}=v1") == f"x://h/p?{name}=v1", name


@pytest.mark.parametrize("url", [c[0] for c in CASES if c[0].startswith(("postgresql", "mysql", "sqlite"))])
def test_the_driver_uses_the_rule(url):
    # study.driver's masked is the rule itself; what a file keeps is the rule's, or a refusal naming the fix.
    assert masked(url) == urls.masked(url)
    try:
        kept = without_password(url)
    except UsageError as e:
        assert PW not in str(e) and re.search(r"not a database URL \((it cannot be read|its user name)", str(e))
        return
    assert kept == urls.without_secrets(url) and PW not in kept
    assert runtime_url(kept, "/s/a", url) == url   # the same URL given again on --resume supplies the secret
