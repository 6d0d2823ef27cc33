"""Hostile case: reads world-readable host files (no permission bit stops it)."""


class Plugin:
    def run(self, payload):
        read = {}
        for path in ("/etc/passwd", "/etc/hostname", "/etc/hosts"):
            try:
                with open(path) as stream:
                    read[path] = stream.read(200)
            except OSError:
                continue
        if read:
            return {"read": read}
        raise PermissionError("no host file outside the allowed paths is readable")
