"""Put on PYTHONPATH by the network tests: host names under .invalid fail to resolve, as
they do with no DNS, without a query leaving the machine."""

import socket

_getaddrinfo = socket.getaddrinfo


def _no_dns(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host or "")
    if name.rstrip(".").endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _no_dns
