#!/usr/bin/env bash
# Debian packages the tests and the demo need: the OCI registry (CNCF distribution as packaged by
# Debian), apache2-utils for htpasswd (registry basic auth), openssl, curl, acl (setfacl). Idempotent.
set -euo pipefail
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)  # the simulated Macs' network namespaces
# The dev node (kubelet's runtime, pod network, Service routing) and the engine-free image build.
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v setfacl >/dev/null || need+=(acl)  # tests: the engine user may search /root (runtimes)
command -v lua5.1 >/dev/null || need+=(lua5.1)  # tests: the Argo CD health script (Lua 5.1, as Argo CD's)
command -v prometheus >/dev/null || need+=(prometheus)  # tests and the demo: scrapes the fleet
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo ">> installing ${need[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
