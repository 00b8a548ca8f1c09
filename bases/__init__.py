"""Basis refreshers: how the eigenbasis ``Q_k`` of each dense factor is refreshed every ``T`` steps."""

from bases.cholesky_qr import CholeskyQR
from bases.eigh import Eigh
from bases.identity import Identity
from bases.qr_power_step import QRPowerStep
from bases.refine import Refine

__all__ = ["CholeskyQR", "Eigh", "Identity", "QRPowerStep", "Refine"]

from precond.safe_globals import allow_package  # after the classes: weights_only loads may rebuild them

allow_package(__name__)
