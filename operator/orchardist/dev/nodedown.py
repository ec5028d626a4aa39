"""Taking the dev node down, including what outlives its processes: containerd's shims, mounts,
the pods' network namespaces, the iptables rules kubelet, kube-proxy and the bridge plugin added,
and the bridge. Works from the records under ``<dev state>/node`` alone, so it also cleans up after
a killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil

from orchardist.dev import nodeconf, procs
from orchardist.dev.registry import stop_at as stop_registry_at

#: Start order of the node's processes; stopped in reverse (containerd last, after its containers).
ORDER = ("containerd", "kubelet", "kube-proxy", "kube-scheduler", "workload-controllers")


def down_at(state: Path) -> list[str]:
    """Take down the node recorded under ``state`` (``<dev state>/node``) and remove it.

    Order: the kubelet and the other node processes; every container task and container (their
    shims exit with them; a shim still serving our socket is killed by pid); containerd; the mounts
    under the node's dirs and the pods' network namespaces; kube-proxy's and the bridge plugin's
    iptables rules; the bridge; the registry.
    """
    meta = state / "node.json"
    if not meta.is_file():
        shutil.rmtree(state, ignore_errors=True)
        return []
    info = json.loads(meta.read_text())
    layout = nodeconf.NodeLayout(str(info["tag"]), state)
    recs = {r.name: r for r in procs.load(state / "pids")} if (state / "pids").is_dir() else {}
    stopped = [
        n for n in reversed(ORDER) if n != "containerd" and n in recs and procs.stop(recs[n], grace=15)
    ]
    netns = (
        _remove_containers(layout) if "containerd" in recs and procs.is_running(recs["containerd"]) else []
    )
    if "containerd" in recs and procs.stop(recs["containerd"], grace=15):
        stopped.append("containerd")
    _kill_shims(layout)
    _unmount_under([layout.state, layout.run, *netns])
    for ns in netns:
        Path(ns).unlink(missing_ok=True)
    _remove_rules(layout, recs.get("kube-proxy"))
    subprocess.run(["ip", "link", "delete", layout.bridge], capture_output=True, timeout=30)
    if stop_registry_at(state / "registry"):
        stopped.append("registry")
    shutil.rmtree(layout.run, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return stopped


def _remove_containers(layout: nodeconf.NodeLayout) -> list[str]:
    """Kill and delete every task and container; return the sandboxes' network namespace paths."""
    base = ["ctr", "--address", str(layout.containerd_socket), "-n", nodeconf.CRI_NAMESPACE]
    listed = subprocess.run([*base, "containers", "ls", "-q"], capture_output=True, text=True, timeout=30)
    netns: list[str] = []
    for cid in listed.stdout.split():
        info = subprocess.run([*base, "containers", "info", cid], capture_output=True, text=True, timeout=30)
        try:
            spec = json.loads(info.stdout).get("Spec") or {}
        except ValueError:
            spec = {}
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            path = os.path.realpath(str(ns.get("path", "")))  # /var/run is a link to /run
            if ns.get("type") == "network" and Path(path).name.startswith("cni-"):
                netns.append(path)
        subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", cid], capture_output=True, timeout=30)
        subprocess.run([*base, "tasks", "rm", "-f", cid], capture_output=True, timeout=30)
        subprocess.run([*base, "containers", "rm", cid], capture_output=True, timeout=30)
    return sorted(set(netns))


def _kill_shims(layout: nodeconf.NodeLayout) -> None:
    """containerd's shims outlive it by design; ours are the ones given our socket's address."""
    sock = str(layout.containerd_socket)
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and Path(cmd[0]).name.startswith("containerd-shim") and sock in cmd:
            with contextlib.suppress(psutil.Error):
                p.kill()


def _unmount_under(prefixes: list[Path | str]) -> None:
    roots = [str(p).rstrip("/") for p in prefixes]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if any(mp == r or mp.startswith(r + "/") for r in roots):
            points.append(mp)
    for mp in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


def _remove_rules(layout: nodeconf.NodeLayout, proxy: procs.ProcRecord | None) -> None:
    """kube-proxy's own cleanup, then whatever kubelet and kube-proxy left in either family, then the
    bridge plugin's masquerade rules for our pods."""
    if proxy is not None and proxy.argv:
        subprocess.run([proxy.argv[0], "--cleanup"], capture_output=True, timeout=60)
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            saved = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True, timeout=30)
            rules = nodeconf.kube_rules_to_delete(saved.stdout)
            if table == "nat" and tool == "iptables":
                rules = nodeconf.cni_rules_to_delete(saved.stdout) + rules
            for args in rules:
                subprocess.run([tool, "-t", table, *args], capture_output=True, timeout=30)
