"""Media types and annotation keys of the OCI model layouts we read and write."""

from __future__ import annotations

from typing import Final

# Manifests and indexes
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS: Final = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES: Final = (OCI_INDEX, DOCKER_LIST)
ACCEPT: Final = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"

# Annotations
TITLE: Final = "org.opencontainers.image.title"
FILEPATH: Final = "org.cncf.model.filepath"
FILE_METADATA: Final = "org.cncf.model.file.metadata+json"
MEDIATYPE_UNTESTED: Final = "org.cncf.model.file.mediatype.untested"
ORAS_UNPACK: Final = "io.deis.oras.content.unpack"

# Docker Model Runner
DMR_CONFIG_V01: Final = "application/vnd.docker.ai.model.config.v0.1+json"
DMR_CONFIG_V02: Final = "application/vnd.docker.ai.model.config.v0.2+json"
DMR_GGUF: Final = "application/vnd.docker.ai.gguf.v3"
DMR_SAFETENSORS: Final = "application/vnd.docker.ai.safetensors"
DMR_MMPROJ: Final = "application/vnd.docker.ai.mmproj"
DMR_LICENSE: Final = "application/vnd.docker.ai.license"
DMR_CHAT_TEMPLATE: Final = "application/vnd.docker.ai.chat.template.jinja"
DMR_FILE: Final = "application/vnd.docker.ai.model.file"
DMR_VLLM_CONFIG_TAR: Final = "application/vnd.docker.ai.vllm.config.tar"
DMR_DIR_TAR: Final = "application/vnd.docker.ai.dir.tar"
DMR_DDUF: Final = "application/vnd.docker.ai.dduf"
DMR_GGUF_LORA: Final = "application/vnd.docker.ai.gguf.v3.lora"
DMR_MMPROJ_SPEC: Final = "application/vnd.docker.ai.gguf.v3.mmproj"

# CNCF ModelPack
MODELPACK_MANIFEST: Final = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG: Final = "application/vnd.cncf.model.config.v1+json"
MODELPACK_PREFIX: Final = "application/vnd.cncf.model."
MODELPACK_WEIGHT_RAW: Final = "application/vnd.cncf.model.weight.v1.raw"
MODELPACK_WEIGHT_CONFIG_RAW: Final = "application/vnd.cncf.model.weight.config.v1.raw"
MODELPACK_DOC_RAW: Final = "application/vnd.cncf.model.doc.v1.raw"
MODELPACK_CODE_RAW: Final = "application/vnd.cncf.model.code.v1.raw"

# KitOps ModelKit
KIT_MANIFEST: Final = "application/vnd.kitops.modelkit.manifest.v1+json"
KIT_CONFIG: Final = "application/vnd.kitops.modelkit.config.v1+json"
KIT_PREFIX: Final = "application/vnd.kitops.modelkit."
