"""plughost's HTTP API."""

from host.api.app import Services, build_services, create_app

__all__ = ["Services", "build_services", "create_app"]
