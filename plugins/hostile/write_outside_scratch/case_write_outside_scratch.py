"""Hostile case: tries to write outside its scratch directory."""

import os


class Plugin:
    def run(self, payload):
        here = os.path.dirname(os.path.abspath(__file__))
        written = []
        for target in (
            "/tmp/plughost-escape",
            "/var/tmp/plughost-escape",
            "/dev/shm/plughost-escape",
            os.path.join(here, "escape"),
            "/root/plughost-escape",
            "/plughost-escape",
        ):
            try:
                with open(target, "w") as f:
                    f.write("x")
                written.append(target)
            except OSError:
                pass
        if written:
            return {"written": written}
        raise PermissionError("nothing outside the scratch directory is writable")
