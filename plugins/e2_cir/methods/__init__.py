"""The composed-retrieval methods, each one small module of the same shape (``base.CIRMethod``)."""
from .base import CIRMethod, NetworkMismatch, QueryBatch, TrainData, load_network, save_network
from .baselines import ImageAndText, ImageOnly, TextOnly
from .cirevl import CIReVL
from .lincir import LinCIR
from .pic2word import Pic2Word
from .searle import SEARLE

#: every method, by the name ``--method`` takes
METHODS = {m.name: m for m in (ImageOnly, TextOnly, ImageAndText, Pic2Word, SEARLE, LinCIR, CIReVL)}

__all__ = ["CIRMethod", "METHODS", "NetworkMismatch", "QueryBatch", "TrainData", "load_network", "save_network"]
