"""Hostile case: recurses without end."""


class Plugin:
    def run(self, payload):
        def down(n):
            return down(n + 1)

        return down(0)
