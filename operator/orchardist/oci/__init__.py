"""OCI model artifacts: references, the registry client, layout readers, the content store, push.

The agent uses :class:`orchardist.oci.store.ContentStore`; the CLI's ``pull``/``push``/``inspect``
live in :mod:`orchardist.oci.cli`. HTTP happens in :mod:`orchardist.oci.client` (the distribution
API) and :mod:`orchardist.oci.transfer` (blob bodies at disk speed), nowhere else.
"""
