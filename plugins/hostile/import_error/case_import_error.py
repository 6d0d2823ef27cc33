"""Hostile case: imports a module that does not exist."""

import module_that_does_not_exist  # noqa


class Plugin:
    def run(self, payload):
        return {}
