"""Hostile case: reads /etc/shadow."""


class Plugin:
    def run(self, payload):
        with open("/etc/shadow") as secret:
            return {"secret": secret.read()}
