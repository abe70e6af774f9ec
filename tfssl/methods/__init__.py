"""Methods and their registry: ``tfssl.methods.get(name)``, ``available()``."""

from __future__ import annotations

from typing import Dict, Type

from tfssl.methods.ascl import ASCL, ASCLBYOL, MoCo
from tfssl.methods.base import SSLModel
from tfssl.methods.mixmatch import MixMatch
from tfssl.methods.paws import PAWS
from tfssl.methods.sela import SeLa
from tfssl.methods.simmatch import FixMatch, SimMatch
from tfssl.methods.supervised import Supervised

_REGISTRY: Dict[str, Type[SSLModel]] = {}


def register(name: str, cls: Type[SSLModel]) -> None:
    """Registers a method class under ``name`` (a new name only)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered.")
    _REGISTRY[name] = cls


def get(name: str) -> Type[SSLModel]:
    """The method class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"--method={name!r} is unknown; available: {available()}.")
    return _REGISTRY[name]


def available():
    """Sorted names of the registered methods."""
    return sorted(_REGISTRY)


register("supervised", Supervised)
register("sela", SeLa)
register("mixmatch", MixMatch)
register("simmatch", SimMatch)
register("fixmatch", FixMatch)
register("ascl", ASCL)
register("moco", MoCo)
register("ascl_byol", ASCLBYOL)
register("paws", PAWS)
