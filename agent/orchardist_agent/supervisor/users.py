"""The unprivileged user engines run as, so an engine cannot read the agent's credentials.

An engine runs code its deployment's author controls (the model directory, engine flags), so it
must not share a uid with the agent, whose kubeconfig and state are 0600/0700. An agent running
as root (the tests, a Linux host) starts the engine as that user directly; an agent running as a
login user (a Mac) goes through ``sudo -n -u <user>`` with a sudoers rule limited to the runtimes'
interpreters (``examples/launchd/README.md`` has the steps). The engine's environment is built
from an allowlist plus the launch's own variables: nothing else of the agent's reaches it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

#: Variables of the agent's environment an engine may inherit (locale, search path). Not TMPDIR:
#: on macOS it is a per-user 0700 directory the engine user cannot enter.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class EngineUser:
    name: str
    uid: int
    gid: int
    home: str


def lookup(name: str) -> EngineUser:
    """The account named `name`; a ValueError that says how to create it when it is missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(
            f"engine user {name!r} does not exist: create it (Linux: useradd --system "
            f"--shell /usr/sbin/nologin {name}; macOS: see examples/launchd/README.md)"
        ) from None
    if entry.pw_uid == 0:
        raise ValueError(f"engine user {name!r} is root: engines need an unprivileged account")
    return EngineUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def engine_env(
    inherited: Mapping[str, str], launch_env: Mapping[str, str], user: EngineUser | None
) -> dict[str, str]:
    """The engine's whole environment: allowlisted inherited variables, the user's identity, the
    launch's variables (these win). Without a user the engine runs as the agent (development)."""
    env = {k: v for k, v in inherited.items() if k in INHERITED_ENV}
    if user is not None:
        env |= {"HOME": user.home, "USER": user.name, "LOGNAME": user.name}
    elif "HOME" in inherited:
        env["HOME"] = inherited["HOME"]
    return env | dict(launch_env)


def sudo_prefix(user: EngineUser, env_names: list[str]) -> list[str]:
    """How a non-root agent starts a program as `user`: sudo without a password prompt, keeping
    only the named variables (values stay in the environment, never on the command line)."""
    keep = ",".join(sorted(env_names))
    return ["sudo", "-n", "-u", user.name, *([f"--preserve-env={keep}"] if keep else []), "--"]


def is_root() -> bool:
    return os.geteuid() == 0
