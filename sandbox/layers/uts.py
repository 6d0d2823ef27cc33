"""Layer uts_namespace: a host name of its own; the machine's name is
neither shown nor changeable.

Detected: a child can unshare CLONE_NEWUTS. Host: nothing.
Child: the flag joins the minimal root's unshare (`sandbox.layers.mnt`).
"""

CLONE_NEWUTS = 0x04000000
