"""The gateway: one OpenAI-compatible front door for every ModelDeployment a key may use.

Pure decisions (:mod:`.picker`, :mod:`.limits`, :mod:`.resolve`, the parsers in :mod:`.keys` and
:mod:`.catalog`) are kept apart from the adapters that act: the watched state (:mod:`.state`), the
upstream calls (:mod:`.upstream`), the demand Leases (:mod:`.demand`) and the HTTP server
(:mod:`.routes`, :mod:`.server`).
"""
