"""Structures: which modes of a weight get a dense Kronecker factor, and how the weight is viewed.

Each structure is a frozen attrs class with the two methods of :class:`precond.parts.Structure`:
``plan(shape) -> precond.Layout`` and ``blocks(shape)`` (``None`` for all but ``NMode(large="block")``).
"""

from structures.diagonal import Diagonal
from structures.kronecker import Kronecker
from structures.layer import LayerMatrix
from structures.matrix import Matrix
from structures.n_mode import NMode
from structures.one_sided import OneSided

__all__ = ["Diagonal", "Kronecker", "LayerMatrix", "Matrix", "NMode", "OneSided"]

from precond.safe_globals import allow_package  # after the classes: weights_only loads may rebuild them

allow_package(__name__)
