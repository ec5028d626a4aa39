"""OCI model artifacts: references, the registry client, layout readers, the content store, push.

The agent uses :class:`orchardist.oci.store.ContentStore`; the CLI's ``pull``/``push``/``inspect``
live in :mod:`orchardist.oci.cli`. Everything that talks HTTP is in :mod:`orchardist.oci.client`.
"""
