"""Deployment on Flower's own binaries, one job per module.

* ``certs.py``: ``fedpersona certs``, the CA, the SuperLink's certificate and the SuperNodes' key pairs;
* ``flower.py``: every Flower command line we build (``flower-superlink``, ``flower-supernode``,
  ``flwr run``, ``flwr supernode register``) and the SuperLink connection in ``$FLWR_HOME/config.toml``;
* ``process.py``: child processes started and stopped by PID;
* ``serve.py``: ``fedpersona serve``, the SuperLink with TLS and node authentication, keys registered;
* ``edge.py``: ``fedpersona edge``, one device's SuperNode under its owner's policy file;
* ``wiretap.py``: a loopback proxy that records what a SuperNode sends, for the deployment wire check.

The Docker images in ``docker/`` run ``fedpersona serve`` and ``fedpersona edge`` as their entrypoints.
"""
