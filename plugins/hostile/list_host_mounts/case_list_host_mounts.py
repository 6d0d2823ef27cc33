"""Hostile case: reads /proc/self/mountinfo for the host's mounts (service
runtime directories, control groups, devices), which map the host."""

HOST_ONLY = ("/run", "/sys/fs/cgroup", "/dev/pts", "/dev/shm", "/var", "/home", "/boot")


class Plugin:
    def run(self, payload):
        with open("/proc/self/mountinfo") as stream:
            points = [line.split()[4] for line in stream]
        host = [p for p in points if p == "/sys" or p.startswith(HOST_ONLY)]
        if not host:
            raise PermissionError("only the call's own mounts are visible")
        return {"host_mounts": host[:20]}
