"""Docker credential helpers: the one place that runs a ``docker-credential-<name>`` program.

The protocol (docker/docker-credential-helpers): run ``docker-credential-<name> get``, write the
server URL on stdin, read ``{"ServerURL", "Username", "Secret"}`` from stdout. A helper that has
nothing for the server exits non-zero and prints "credentials not found"; the username
``<token>`` means the secret is an identity (refresh) token, not a password.

Only the user's own Docker config names helpers: credentials from a Kubernetes Secret never run a
program, since whoever writes the Secret would choose what the operator executes. No message or
log here holds the secret or the helper's output (which may be the secret, garbled).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass

from orchardist import log
from orchardist.oci.errors import OCIError

_log = log.get(__name__)

PREFIX = "docker-credential-"
#: a helper that hangs (a locked keychain waiting for a prompt) fails instead of stalling a pull
TIMEOUT_S = 30.0
#: a reply bigger than this is not credentials
REPLY_LIMIT = 1 << 20
TOKEN_USER = "<token>"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NOT_FOUND = "credentials not found"


class CredentialHelperError(OCIError):
    """A helper is missing, failed or answered something that is not credentials."""

    reason = "CredentialHelperFailed"


@dataclass(frozen=True)
class HelperReply:
    username: str
    secret: str
    identity_token: bool

    def __repr__(self) -> str:  # never print a secret into a log
        return f"HelperReply(username={self.username!r}, secret=***, identity_token={self.identity_token})"


def program(name: str) -> str:
    """The helper's executable name; a name that could be a path or an option is refused."""
    if not _NAME.fullmatch(name):
        raise CredentialHelperError(f"credential helper name {name!r} is not a plain program name")
    return PREFIX + name


def parse_reply(stdout: bytes, helper: str) -> HelperReply:
    """The credentials in a helper's ``get`` reply (pure)."""
    try:
        body = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        raise CredentialHelperError(f"{helper} get: the reply is not JSON") from None
    if not isinstance(body, dict):
        raise CredentialHelperError(f"{helper} get: the reply is not a JSON object")
    user, secret = body.get("Username"), body.get("Secret")
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        raise CredentialHelperError(f"{helper} get: the reply has no Username and Secret strings")
    if user == TOKEN_USER:
        return HelperReply("", secret, identity_token=True)
    return HelperReply(user, secret, identity_token=False)


def get(name: str, server_url: str, *, timeout: float = TIMEOUT_S) -> HelperReply | None:
    """Ask helper ``name`` for ``server_url``'s credentials; None when it has none for it."""
    helper = program(name)
    path = shutil.which(helper)
    if path is None:
        raise CredentialHelperError(
            f"the Docker config names credential helper {name!r} but {helper} is not on PATH"
        )
    try:
        done = subprocess.run(  # a fixed program found on PATH, no shell
            [path, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CredentialHelperError(f"{helper} get: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise CredentialHelperError(f"{helper} get: cannot run it: {exc.strerror or exc}") from None
    if done.returncode != 0:
        if _NOT_FOUND in done.stdout.decode(errors="replace").lower():
            _log.info("credential helper has none", helper=helper, server=server_url)
            return None
        # stderr/stdout are not echoed: a helper may print the secret it failed to parse
        raise CredentialHelperError(f"{helper} get: exited with status {done.returncode}")
    if len(done.stdout) > REPLY_LIMIT:
        raise CredentialHelperError(f"{helper} get: the reply is larger than {REPLY_LIMIT} bytes")
    reply = parse_reply(done.stdout, helper)
    _log.info("credential helper answered", helper=helper, server=server_url, token=reply.identity_token)
    return reply
