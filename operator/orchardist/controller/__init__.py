"""The controller: places ModelReplicas on Macs, exposes them, heals and rolls them, reports honestly.

Pure, tested as tables: ``scheduler`` (filter + score MacNodes), ``fitting`` (the memory planner
bound to one deployment), ``plan`` (what to create, delete, expose and report), ``status``
(conditions). Acting: ``kube`` (the one Kubernetes adapter), ``reconciler`` (gathers, decides,
acts; coalesces triggers), ``handlers`` (kopf wiring), ``cli`` (``orchardist operator run``).
"""
