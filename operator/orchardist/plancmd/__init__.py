"""``orchardist plan``: a model's memory plan on a Mac, from the command line.

The planning itself is ``orchardist.planning`` (pure, shared with the controller); this package
does the command's I/O, one module per job: ``args`` (the options), ``sources`` (model profiles
from files, GGUF headers and registries), ``cluster`` (a MacNode and its replicas from
Kubernetes), ``render`` (tables and JSON) and ``command`` (``register`` and ``run``).
"""


class InputError(Exception):
    """A model or Mac the planner cannot use (bad file, unreachable registry or cluster): exit 2, say why."""
