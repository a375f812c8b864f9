"""The registrar: the platform's HTTP side (device API and health; admin API and console later)."""

from iotbiz.registrar.app import create_app

__all__ = ["create_app"]
