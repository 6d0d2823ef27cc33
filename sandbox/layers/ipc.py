"""Layer ipc_namespace: System V IPC and POSIX message queues of its own: no shared memory segment
or semaphore of another call or of the host is reachable.

Detected: a child can unshare CLONE_NEWIPC. Host: nothing.
Child: the flag joins the minimal root's unshare (`sandbox.layers.mnt`).
"""

CLONE_NEWIPC = 0x08000000
