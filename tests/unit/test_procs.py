"""The pure parts of process identity and the control plane's process records (no process is started
here: tests/integration/test_procs.py runs real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchardist import processes
from orchardist.dev import cluster, procs
from orchardist.processes import Identity, Verdict

REC = Identity(pid=4242, started="boot-a:12.34", digest=processes.argv_digest(["etcd", "--data-dir", "d"]))


@pytest.mark.parametrize(
    ("found", "exists", "verdict"),
    [
        (REC, True, "same"),
        (None, False, "gone"),  # nothing at the pid any more
        (None, True, "other"),  # a zombie or another user's process: unreadable, never ours
        (Identity(4242, "boot-a:99.00", REC.digest), True, "other"),  # pid reused
        (Identity(4242, "boot-b:12.34", REC.digest), True, "other"),  # same ticks, another boot
        (Identity(4242, REC.started, processes.argv_digest(["etcd"])), True, "other"),  # other program
    ],
)
def test_compare_a_record_with_what_runs_at_its_pid(
    found: Identity | None, exists: bool, verdict: Verdict
) -> None:
    assert processes.compare(REC, found, exists=exists) == verdict


@pytest.mark.parametrize(
    ("argv", "joined"),
    [
        (["a", "b c"], "a b c"),  # arguments joined by single spaces, as records always held them
        ([], ""),
        (("python", "-m", "mlx_lm", "server"), "python -m mlx_lm server"),
    ],
)
def test_argv_digest_is_the_sha256_of_the_joined_arguments(argv: list[str], joined: str) -> None:
    import hashlib

    assert processes.argv_digest(argv) == hashlib.sha256(joined.encode()).hexdigest()


def record(name: str, start: str) -> procs.ProcRecord:
    return procs.ProcRecord(name=name, pid=100, start_time=start, argv=[name, "--x"], log=f"/l/{name}.log")


def test_a_record_round_trips_and_carries_its_identity() -> None:
    rec = record("etcd", "boot:5.00")
    assert procs.ProcRecord.from_json(rec.to_json()) == rec
    assert rec.identity == Identity(100, "boot:5.00", processes.argv_digest(["etcd", "--x"]))


def test_records_load_in_start_order(tmp_path: Path) -> None:
    """Stamps sort by their seconds (after the boot id); an unknown stamp format sorts first."""
    recs = [
        record("apiserver", "b:20.50"),
        record("etcd", "b:3.25"),
        record("old", "Mon Nov 30"),
        record("z", "9"),
    ]
    procs.save(recs, tmp_path)
    assert [r.name for r in procs.load(tmp_path)] == ["old", "etcd", "z", "apiserver"]


def test_missing_control_plane_binaries_are_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    monkeypatch.setenv("ORCHARDIST_KUBEBINS", str(tmp_path))
    with pytest.raises(cluster.KubebinsMissingError, match="lacks kube-apiserver, kube-controller-manager"):
        cluster.find_kubebins()


def test_cluster_start_refuses_a_foreign_non_empty_state_dir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no cluster record"):
        cluster.Cluster.start(tmp_path, bin_dir=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
