"""The composed-retrieval methods, each one small module of the same shape (``base.CIRMethod``), found
through the ``e2_plugins.cir_methods`` entry-point group (the built-in ones register as a third party's)."""
from e2_core.registry import CIR_METHOD_GROUP, Registry

from .base import CIRMethod, NetworkMismatch, QueryBatch, TrainData, load_network, load_original, save_network

#: every installed method, by the name ``--method`` takes (loaded when used)
METHODS = Registry(CIR_METHOD_GROUP)

__all__ = ["CIRMethod", "METHODS", "NetworkMismatch", "QueryBatch", "TrainData", "load_network", "load_original",
           "save_network"]
