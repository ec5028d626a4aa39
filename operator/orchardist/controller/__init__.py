"""The controller: places ModelReplicas on Macs, exposes them, heals and rolls them, reports honestly.

Pure, tested as tables: ``world`` (bodies read through the API types, then the plan's inputs),
``scheduler`` (filter + score MacNodes), ``fitting`` (the memory planner bound to one deployment),
``plan`` (what to create and delete), ``exposure`` (Service + EndpointSlices), ``status``
(conditions and the whole status), ``outcome`` (the Plan type). Acting: ``pinning`` (tags to
digests and profiles, via the registry), ``kube`` (the one Kubernetes adapter), ``reconciler``
(gathers, decides, acts; coalesces triggers), ``handlers`` (kopf wiring), ``cli``
(``orchardist operator run``).
"""
