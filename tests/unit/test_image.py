"""The operator image: reproducible layers, a consistent OCI layout, and a Dockerfile that builds the
same thing as ``make image`` (same staging script, same user, environment, command and labels)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import tarfile
from pathlib import Path

from orchardist.dev import image

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path, mtime: int) -> Path:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "dev" / "null-ish").write_text("runtime provides /dev")
    exe = root / "usr" / "bin" / "tool"
    exe.write_text("#!/usr/bin/python3\n")
    exe.chmod(0o755)
    (root / "usr" / "bin" / "alias").symlink_to("tool")
    for p in [exe, root / "usr" / "bin", root / "usr", root / "dev" / "null-ish"]:
        os.utime(p, (mtime, mtime))
    return root


def test_layer_is_reproducible_and_owned_by_root(tmp_path: Path) -> None:
    a = image.layer_tar(_tree(tmp_path / "a", 2_000_000_000), epoch=1_700_000_000)
    b = image.layer_tar(_tree(tmp_path / "b", 2_100_000_000), epoch=1_700_000_000)
    assert a == b, "the same content packs to the same bytes whatever the files' times"
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert not any(n.startswith("dev/") for n in members), "the runtime provides /dev"
    assert {m.uid for m in members.values()} == {0}
    assert {m.mtime for m in members.values()} == {1_700_000_000}
    assert members["usr/bin/tool"].mode == 0o755
    assert members["usr/bin/alias"].issym() and members["usr/bin/alias"].linkname == "tool"
    names = list(members)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")


def test_older_times_are_kept(tmp_path: Path) -> None:
    raw = image.layer_tar(_tree(tmp_path / "t", 1_000), epoch=1_700_000_000)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getmember("usr/bin/tool").mtime == 1_000


def test_pack_writes_a_consistent_layout(tmp_path: Path) -> None:
    trees = [_tree(tmp_path / "base", 5), tmp_path / "app"]
    (tmp_path / "app" / "opt").mkdir(parents=True)
    (tmp_path / "app" / "opt" / "x").write_text("x")
    config = image.image_config(
        [],
        epoch=7,
        labels=image.operator_labels("1.2.3", "abc", 7),
        user=image.USER,
        env=image.ENV,
        entrypoint=image.ENTRYPOINT,
        cmd=image.CMD,
    )
    out = tmp_path / "layout"
    blob = image.pack(trees, out, ref="1.2.3", config=config, epoch=7)
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == blob.digest
    layout = image.Layout(out)
    manifest = json.loads(layout.blob(blob.digest))
    cfg = json.loads(layout.blob(manifest["config"]["digest"]))
    assert len(manifest["layers"]) == 2
    for desc, diff_id in zip(manifest["layers"], cfg["rootfs"]["diff_ids"], strict=True):
        data = layout.blob(desc["digest"])
        assert len(data) == desc["size"]
        assert f"sha256:{hashlib.sha256(gzip.decompress(data)).hexdigest()}" == diff_id
    assert cfg["config"]["User"] == "65532:65532"
    assert manifest["annotations"]["org.opencontainers.image.revision"] == "abc"
    assert manifest["annotations"]["org.opencontainers.image.version"] == "1.2.3"
    again = image.pack(trees, tmp_path / "again", ref="1.2.3", config=config, epoch=7)
    assert again.digest == blob.digest, "same inputs, same image digest"


# ---- the Dockerfile builds what `make image` builds ------------------------------------------------


def _final_stage() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_dockerfile_runs_the_same_staging_script() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^RUN .*bash hack/build-image\.sh --stage /out$", text, re.M)
    stage = _final_stage()
    assert stage[0] == ("FROM", "scratch"), "nothing in the image but the staged trees"
    copies = [arg for op, arg in stage if op == "COPY"]
    script = (REPO / "hack" / "build-image.sh").read_text()
    staged = re.findall(r'stage_(\w+) "\$out/(\w+)"', script)
    assert staged == [("base", "base"), ("deps", "deps"), ("app", "app")]
    assert copies == [f"--from=build /out/{name}/ /" for _, name in staged]


def test_dockerfile_settings_equal_the_engine_free_build() -> None:
    stage = _final_stage()
    env = dict(kv.split("=", 1) for op, arg in stage if op == "ENV" for kv in shlex.split(arg))
    assert env == image.ENV
    assert [arg for op, arg in stage if op == "USER"] == [image.USER]
    assert [json.loads(arg) for op, arg in stage if op == "ENTRYPOINT"] == [image.ENTRYPOINT]
    assert [json.loads(arg) for op, arg in stage if op == "CMD"] == [image.CMD]
    labels = [kv.split("=", 1)[0] for op, arg in stage if op == "LABEL" for kv in shlex.split(arg)]
    assert tuple(labels) == image.LABEL_KEYS
    source = next(kv for op, arg in stage if op == "LABEL" for kv in shlex.split(arg) if "source" in kv)
    assert source.split("=", 1)[1] == image.SOURCE


def test_chart_runs_the_images_command() -> None:
    """The chart overrides the entrypoint with `orchardist operator run`: it must be on the image's PATH."""
    deployment = (REPO / "charts" / "orchardist" / "templates" / "operator-deployment.yaml").read_text()
    assert 'command: ["orchardist", "operator", "run"]' in deployment
    assert "/usr/local/bin" in image.ENV["PATH"].split(":")
    script = (REPO / "hack" / "build-image.sh").read_text()
    assert '"$1/usr/local/bin/orchardist"' in script


def test_base_lists_no_shell() -> None:
    listed = [
        ln.strip()
        for ln in (REPO / "hack" / "image" / "debian-packages.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert "python3-minimal" in listed
    assert not {"dash", "bash", "busybox", "busybox-static"} & set(listed)
