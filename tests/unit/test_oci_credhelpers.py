"""Docker credential helpers, run for real: a ``docker-credential-test`` script on PATH.

The script records what it was asked (argv and stdin) and answers as the test tells it, so the
protocol is checked end to end: ``get`` with the server URL on stdin, JSON out, ``<token>`` for an
identity token, "credentials not found" for none, and every failure as a clear error that never
carries the secret.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchardist.oci import credhelpers
from orchardist.oci.auth import (
    Credentials,
    from_dockerconfig,
    from_secret_data,
    from_user_config,
    helper_for,
    token_form,
)
from orchardist.oci.credhelpers import CredentialHelperError, parse_reply
from orchardist.oci.reference import parse

SECRET = "s3cr3t-Do-Not-Print"


def _helper(bindir: Path, name: str, *, stdout: str, code: int = 0, stderr: str = "") -> Path:
    """Write ``docker-credential-<name>``: logs argv and stdin beside itself, prints ``stdout``."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    log = bindir / f"{name}.calls"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s|" "$@" >> "{log}"\n'
        f'cat >> "{log}"\n'
        f'echo >> "{log}"\n'
        f"cat <<'EOF'\n{stdout}\nEOF\n"
        + (f"cat >&2 <<'EOF'\n{stderr}\nEOF\n" if stderr else "")
        + f"exit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ.get('PATH', '')}")
    return d


def _config(tmp_path: Path, body: dict[str, object]) -> Path:
    p = tmp_path / "docker" / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(body))
    return p


def _reply(user: str, secret: str = SECRET) -> str:
    return json.dumps({"ServerURL": "x", "Username": user, "Secret": secret})


def test_creds_store_answers_with_the_server_url_on_stdin(bindir: Path, tmp_path: Path) -> None:
    log = _helper(bindir, "test", stdout=_reply("alice"))
    cfg = _config(tmp_path, {"credsStore": "test", "auths": {"registry.example.com:5000": {}}})
    got = from_user_config(parse("registry.example.com:5000/m:1"), cfg)
    assert got == Credentials("alice", SECRET)
    assert log.read_text() == "get|registry.example.com:5000\n"


def test_docker_hub_is_asked_by_its_v1_url(bindir: Path, tmp_path: Path) -> None:
    log = _helper(bindir, "test", stdout=_reply("hubuser"))
    cfg = _config(tmp_path, {"credsStore": "test"})
    assert from_user_config(parse("ai/smollm2:360M"), cfg) == Credentials("hubuser", SECRET)
    assert log.read_text() == "get|https://index.docker.io/v1/\n"


def test_cred_helpers_per_registry_come_before_the_store(bindir: Path, tmp_path: Path) -> None:
    _helper(bindir, "test", stdout=_reply("from-store"))
    _helper(bindir, "ghcr", stdout=_reply("from-ghcr"))
    cfg = _config(tmp_path, {"credsStore": "test", "credHelpers": {"ghcr.io": "ghcr"}})
    assert from_user_config(parse("ghcr.io/org/m:1"), cfg) == Credentials("from-ghcr", SECRET)
    assert from_user_config(parse("quay.io/org/m:1"), cfg) == Credentials("from-store", SECRET)


def test_token_username_is_an_identity_token(bindir: Path, tmp_path: Path) -> None:
    _helper(bindir, "test", stdout=_reply("<token>", "refresh-me"))
    cfg = _config(tmp_path, {"credHelpers": {"myregistry.azurecr.io": "test"}})
    got = from_user_config(parse("myregistry.azurecr.io/m:1"), cfg)
    assert got == Credentials("", "refresh-me", identity_token=True)
    assert "refresh-me" not in repr(got)


def test_not_found_is_no_credentials(bindir: Path, tmp_path: Path) -> None:
    _helper(bindir, "test", stdout="credentials not found in native keychain", code=1)
    cfg = _config(tmp_path, {"credsStore": "test", "auths": {"r.example.com": {"auth": "dTpw"}}})
    # Docker asks only the helper once one is named: the auths entry is not a fallback
    assert from_user_config(parse("r.example.com/m"), cfg) is None


def test_missing_helper_is_a_clear_error(bindir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"credsStore": "nosuchhelper"})
    with pytest.raises(CredentialHelperError, match=r"docker-credential-nosuchhelper is not on PATH"):
        from_user_config(parse("r.example.com/m"), cfg)


@pytest.mark.parametrize(
    ("stdout", "code", "stderr", "message"),
    [
        (f"oops {SECRET}", 3, f"cannot parse {SECRET}", r"exited with status 3"),
        (f"not json {SECRET}", 0, "", r"the reply is not JSON"),
        (json.dumps({"Username": "u"}), 0, "", r"no Username and Secret"),
        (json.dumps([SECRET]), 0, "", r"not a JSON object"),
    ],
    ids=["exit-non-zero", "garbage", "no-secret", "not-an-object"],
)
def test_failures_say_what_failed_and_never_the_secret(
    bindir: Path, tmp_path: Path, stdout: str, code: int, stderr: str, message: str
) -> None:
    _helper(bindir, "test", stdout=stdout, code=code, stderr=stderr)
    cfg = _config(tmp_path, {"credsStore": "test"})
    with capture_logs() as logs, pytest.raises(CredentialHelperError, match=message) as info:
        from_user_config(parse("r.example.com/m"), cfg)
    assert "docker-credential-test get" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(logs)


def test_a_helper_name_that_is_a_path_is_refused(bindir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"credsStore": "../../bin/sh"})
    with pytest.raises(CredentialHelperError, match="not a plain program name"):
        from_user_config(parse("r.example.com/m"), cfg)


def test_a_hung_helper_times_out(bindir: Path) -> None:
    script = bindir / "docker-credential-slow"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    with pytest.raises(CredentialHelperError, match="no answer within"):
        credhelpers.get("slow", "r.example.com", timeout=0.5)


def test_a_secret_never_runs_a_helper(bindir: Path) -> None:
    """A pull Secret's config comes from whoever may write Secrets: its helpers are never run."""
    log = _helper(bindir, "test", stdout=_reply("alice"))
    config = {"credsStore": "test", "auths": {"r.example.com": {"username": "u", "password": "p"}}}
    data = {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}
    assert from_secret_data(data, parse("r.example.com/m")) == Credentials("u", "p")
    assert not log.exists()


@pytest.mark.parametrize(
    ("config", "ref", "expected"),
    [
        ({"credsStore": "desktop"}, "r.example.com/m", "desktop"),
        (
            {"credHelpers": {"r.example.com": "ecr-login"}, "credsStore": "desktop"},
            "r.example.com/m",
            "ecr-login",
        ),
        ({"credHelpers": {"https://index.docker.io/v1/": "hub"}}, "docker.io/library/x", "hub"),
        ({"credHelpers": {"other.example.com": "x"}}, "r.example.com/m", None),
        ({"credsStore": ""}, "r.example.com/m", None),
        ({}, "r.example.com/m", None),
    ],
)
def test_helper_for(config: dict[str, object], ref: str, expected: str | None) -> None:
    assert helper_for(config, parse(ref)) == expected


def test_identitytoken_in_auths() -> None:
    cfg = {"auths": {"myregistry.azurecr.io": {"identitytoken": "rt-1"}}}
    assert from_dockerconfig(cfg, parse("myregistry.azurecr.io/m")) == Credentials(
        "", "rt-1", identity_token=True
    )


def test_token_form() -> None:
    form = token_form(
        Credentials("", "rt-1", identity_token=True),
        [("service", "reg"), ("scope", "repository:a:pull"), ("scope", "repository:b:pull")],
    )
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "client_id": "orchardist",
        "service": "reg",
        "scope": "repository:a:pull repository:b:pull",
    }


def test_parse_reply_keeps_the_username() -> None:
    assert parse_reply(_reply("bob").encode(), "h") == credhelpers.HelperReply("bob", SECRET, False)
