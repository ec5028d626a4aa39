"""Local development: a real control plane (etcd, kube-apiserver, kube-controller-manager) on
loopback, used both by ``orchardist dev`` and by the test fixtures, plus the demo wiring."""
