"""Basis refreshers: how the eigenbasis ``Q_k`` of each dense factor is refreshed every ``T`` steps."""

from bases.cholesky_qr import CholeskyQR
from bases.eigh import Eigh
from bases.identity import Identity
from bases.qr_power_step import QRPowerStep

__all__ = ["CholeskyQR", "Eigh", "Identity", "QRPowerStep"]

from precond.checkpoint import allow_package  # after the classes: weights_only loads may rebuild them

allow_package(__name__)
