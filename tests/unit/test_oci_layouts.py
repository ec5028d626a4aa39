"""Layout readers as tables: manifest in, (path, archive, role) per layer out."""

from __future__ import annotations

from typing import Any

import pytest

from orchardist.oci import mediatypes as mt
from orchardist.oci.errors import UnknownLayoutError, UnsafePathError
from orchardist.oci.layouts import describe_config, read_layout


def _d(media_type: str, n: int, **ann: str) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": "sha256:" + f"{n:02x}" * 32, "size": 100 * n}
    if ann:
        d["annotations"] = ann
    return d


def _m(config_mt: str, layers: list[dict[str, Any]], artifact: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": _d(config_mt, 99),
        "layers": layers,
    }
    if artifact:
        m["artifactType"] = artifact
    return m


FP, TITLE = mt.FILEPATH, mt.TITLE
CASES = {
    "dmr-v0.2": (
        _m(
            mt.DMR_CONFIG_V02,
            [
                _d(mt.DMR_SAFETENSORS, 1, **{FP: "model-00001-of-00002.safetensors"}),
                _d(mt.DMR_SAFETENSORS, 2, **{FP: "model-00002-of-00002.safetensors"}),
                _d(mt.DMR_FILE, 3, **{FP: "config.json"}),
                _d(mt.DMR_CHAT_TEMPLATE, 4, **{FP: "chat_template.jinja"}),
                _d(mt.DMR_LICENSE, 5, **{FP: "LICENSE"}),
                _d(mt.DMR_DIR_TAR, 6, **{FP: "tokenizer"}),
            ],
        ),
        "docker-model-runner",
        "safetensors",
        [
            ("model-00001-of-00002.safetensors", None, "weight"),
            ("model-00002-of-00002.safetensors", None, "weight"),
            ("config.json", None, "config"),
            ("chat_template.jinja", None, "config"),
            ("LICENSE", None, "doc"),
            ("", "tar", "other"),  # Docker extracts a dir.tar at the model root
        ],
    ),
    "dmr-v0.1-bare": (
        _m(
            mt.DMR_CONFIG_V01,
            [_d(mt.DMR_GGUF, 1), _d(mt.DMR_GGUF, 2), _d(mt.DMR_LICENSE, 3), _d(mt.DMR_VLLM_CONFIG_TAR, 4)],
        ),
        "docker-model-runner",
        "gguf",
        [
            ("model-00001-of-00002.gguf", None, "weight"),
            ("model-00002-of-00002.gguf", None, "weight"),
            ("LICENSE", None, "doc"),
            ("", "tar", "config"),
        ],
    ),
    "dmr-v0.1-annotated": (
        _m(mt.DMR_CONFIG_V01, [_d(mt.DMR_GGUF, 1, **{FP: "qwen3-0.6b-Q4_K_M.gguf"})]),
        "docker-model-runner",
        "gguf",
        [("qwen3-0.6b-Q4_K_M.gguf", None, "weight")],
    ),
    "modelpack": (
        _m(
            mt.MODELPACK_CONFIG,
            [
                _d(mt.MODELPACK_WEIGHT_RAW, 1, **{FP: "model.safetensors", TITLE: "model.safetensors"}),
                _d("application/vnd.cncf.model.weight.config.v1.tar+zstd", 2),
                _d("application/vnd.cncf.model.doc.v1.tar+gzip", 3),
                _d("application/vnd.cncf.model.code.v1.tar", 4),
                _d("application/vnd.cncf.model.weight.v1.gguf", 5, **{TITLE: "legacy.gguf"}),
            ],
            artifact=mt.MODELPACK_MANIFEST,
        ),
        "modelpack",
        "safetensors",
        [
            ("model.safetensors", None, "weight"),
            ("", "tar+zstd", "config"),
            ("", "tar+gzip", "doc"),
            ("", "tar", "code"),
            ("legacy.gguf", None, "weight"),
        ],
    ),
    "modelpack-by-config-only": (
        _m(mt.MODELPACK_CONFIG, [_d(mt.MODELPACK_WEIGHT_RAW, 1, **{TITLE: "w.gguf"})]),
        "modelpack",
        "gguf",
        [("w.gguf", None, "weight")],
    ),
    "kitops": (
        _m(
            mt.KIT_CONFIG,
            [
                _d("application/vnd.kitops.modelkit.model.v1.tar", 1),
                _d("application/vnd.kitops.modelkit.modelpart.v1.tar+gzip", 2),
                _d("application/vnd.kitops.modelkit.docs.v1.tar+zstd", 3),
                _d("application/vnd.kitops.modelkit.code.v1.raw", 4, **{TITLE: "run.py"}),
            ],
            artifact=mt.KIT_MANIFEST,
        ),
        "kitops",
        None,
        [
            ("", "tar", "weight"),
            ("", "tar+gzip", "weight"),
            ("", "tar+zstd", "doc"),
            ("run.py", None, "code"),
        ],
    ),
    "oras": (
        _m(
            mt.OCI_EMPTY,
            [
                _d("application/octet-stream", 1, **{TITLE: "weights/model.safetensors"}),
                _d("application/json", 2, **{TITLE: "config.json"}),
                _d(mt.OCI_LAYER_TAR_GZIP, 3, **{TITLE: "tok", mt.ORAS_UNPACK: "true"}),
            ],
        ),
        "oras",
        "safetensors",
        [
            ("weights/model.safetensors", None, "weight"),
            ("config.json", None, "config"),
            ("", "tar+gzip", "other"),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_layout(case: str) -> None:
    manifest, name, fmt, expected = CASES[case]
    layout = read_layout(manifest)
    assert layout.name == name
    assert layout.format == fmt
    assert [(e.path, e.archive, e.role) for e in layout.entries] == expected
    assert layout.total_bytes == sum(d["size"] for d in manifest["layers"])


def test_weight_bytes_are_exact_layer_sizes() -> None:
    layout = read_layout(CASES["dmr-v0.2"][0])
    assert layout.weight_bytes == 100 + 200


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (_m("application/vnd.x+json", [_d("application/vnd.y", 1)]), "application/vnd.y"),
        (_m(mt.DMR_CONFIG_V02, [_d(mt.DMR_SAFETENSORS, 1)]), "has no org.cncf.model.filepath"),
        (_m(mt.MODELPACK_CONFIG, [_d(mt.MODELPACK_WEIGHT_RAW, 1)]), "no org.cncf.model.filepath"),
        (
            _m(mt.MODELPACK_CONFIG, [_d("application/vnd.cncf.model.weight.v1.tar+lz4", 1)]),
            "unknown media type",
        ),
        (_m(mt.KIT_CONFIG, [_d("application/vnd.kitops.modelkit.model.v2.tar", 1)]), "unknown media type"),
        (_m(mt.OCI_EMPTY, []), "no layers"),
        ({"layers": [_d("x", 1)]}, "no config"),
        (
            _m(mt.DMR_CONFIG_V02, [_d(mt.DMR_FILE, 1, **{FP: "a"}), _d(mt.DMR_FILE, 2, **{FP: "./a"})]),
            "twice",
        ),
    ],
)
def test_unknown_or_malformed(manifest: dict[str, Any], match: str) -> None:
    with pytest.raises(UnknownLayoutError, match=match):
        read_layout(manifest)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "a\\b", "."])
def test_unsafe_paths_refused_before_download(path: str) -> None:
    with pytest.raises(UnsafePathError):
        read_layout(_m(mt.DMR_CONFIG_V02, [_d(mt.DMR_FILE, 1, **{FP: path})]))


def test_describe_config() -> None:
    dmr = read_layout(CASES["dmr-v0.1-annotated"][0])
    cfg = {"config": {"format": "gguf", "architecture": "qwen3", "parameters": "0.6B", "context_size": 40960}}
    assert describe_config(dmr, cfg) == {
        "format": "gguf",
        "architecture": "qwen3",
        "parameters": "0.6B",
        "context_size": 40960,
    }
    mp = read_layout(CASES["modelpack"][0])
    assert describe_config(
        mp, {"config": {"paramSize": "8b", "format": "safetensors"}, "descriptor": {"name": "m"}}
    ) == {"format": "safetensors", "parameters": "8b", "name": "m"}


# ---- producers' layouts, pure parts --------------------------------------------------------------


@pytest.mark.parametrize("title", [".", "./", "model"])
def test_oras_directory_layer_titles(title: str) -> None:
    """``oras push REF .`` titles its one tar+gzip layer ``.``: the model root, not a file name."""
    layer = _d(mt.OCI_LAYER_TAR_GZIP, 1, **{TITLE: title, mt.ORAS_UNPACK: "true"})
    layout = read_layout(_m(mt.OCI_EMPTY, [layer], "application/vnd.unknown.artifact.v1"))
    assert [(e.path, e.archive) for e in layout.entries] == [("", "tar+gzip")]


@pytest.mark.parametrize("title", ["../up", "/abs", "a/../../x"])
def test_oras_directory_title_still_cannot_escape(title: str) -> None:
    layer = _d(mt.OCI_LAYER_TAR_GZIP, 1, **{TITLE: title, mt.ORAS_UNPACK: "true"})
    with pytest.raises(UnsafePathError):
        read_layout(_m(mt.OCI_EMPTY, [layer]))


def _tar_layout(media_type: str, config_mt: str, artifact: str, **ann: str) -> Any:
    return read_layout(_m(config_mt, [_d(media_type, 1, **ann)], artifact))


@pytest.mark.parametrize(
    ("layout_args", "files", "config", "expected"),
    [
        # modctl names the packed file in the layer's filepath annotation
        (
            (
                "application/vnd.cncf.model.weight.v1.tar",
                mt.MODELPACK_CONFIG,
                mt.MODELPACK_MANIFEST,
                {FP: "m.gguf"},
            ),
            [],
            None,
            "gguf",
        ),
        # the extracted files say it
        (
            ("application/vnd.kitops.modelkit.model.v1.tar", mt.KIT_CONFIG, mt.KIT_MANIFEST, {}),
            ["w/model.safetensors"],
            None,
            "safetensors",
        ),
        # the Kitfile's model path says it
        (
            ("application/vnd.kitops.modelkit.model.v1.tar+gzip", mt.KIT_CONFIG, mt.KIT_MANIFEST, {}),
            [],
            {"model": {"path": "./tiny.gguf"}},
            "gguf",
        ),
        # ModelPack's config.format says it
        (
            ("application/vnd.cncf.model.weight.v1.tar+zstd", mt.MODELPACK_CONFIG, mt.MODELPACK_MANIFEST, {}),
            [],
            {"config": {"format": "GGUF"}},
            "gguf",
        ),
        # nothing says it
        (
            ("application/vnd.cncf.model.weight.v1.tar", mt.MODELPACK_CONFIG, mt.MODELPACK_MANIFEST, {}),
            ["README.md"],
            {"config": {"format": "onnx"}},
            None,
        ),
    ],
)
def test_tar_layer_format(
    layout_args: tuple[str, str, str, dict[str, str]],
    files: list[str],
    config: dict[str, Any] | None,
    expected: str | None,
) -> None:
    media_type, config_mt, artifact, ann = layout_args
    layout = _tar_layout(media_type, config_mt, artifact, **ann)
    assert layout.format is None  # the manifest alone cannot tell
    assert layout.format_with(files, config) == expected


@pytest.mark.parametrize(
    ("rels", "wanted", "expected"),
    [
        (["tiny.gguf"], "auto", mt.DMR_CONFIG_V01),
        (
            ["model-00001-of-00002.gguf", "model-00002-of-00002.gguf", "LICENSE", "template.jinja"],
            "auto",
            mt.DMR_CONFIG_V01,
        ),
        (["tiny.gguf", "README.md"], "auto", mt.DMR_CONFIG_V02),  # v0.1 cannot name README.md
        (["sub/tiny.gguf"], "auto", mt.DMR_CONFIG_V02),  # nor a nested path
        (["model.safetensors", "config.json"], "auto", mt.DMR_CONFIG_V02),
        (["tiny.gguf"], "v0.2", mt.DMR_CONFIG_V02),
        (["tiny.gguf", "LICENSE"], "v0.1", mt.DMR_CONFIG_V01),
    ],
)
def test_docker_config_version(rels: list[str], wanted: Any, expected: str) -> None:
    from orchardist.oci.push import docker_config_version

    assert docker_config_version(rels, wanted) == expected


@pytest.mark.parametrize("rels", [["tiny.gguf", "config.json"], ["model.safetensors"]])
def test_docker_config_v01_refuses_what_it_cannot_hold(rels: list[str]) -> None:
    from orchardist.oci.errors import OCIError
    from orchardist.oci.push import docker_config_version

    with pytest.raises(OCIError, match=r"v0\.1 holds only"):
        docker_config_version(rels, "v0.1")


def test_dir_tar_annotation_is_the_tar_file_name_not_a_directory() -> None:
    layout = read_layout(_m(mt.DMR_CONFIG_V02, [_d(mt.DMR_DIR_TAR, 1, **{FP: "dir-tar-2961337105.tar"})]))
    assert [(e.path, e.archive) for e in layout.entries] == [("", "tar")]
