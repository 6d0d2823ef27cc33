"""plughost's HTTP API."""

from host.api.app import create_app
from host.services.build import Services, build_services

__all__ = ["Services", "build_services", "create_app"]
