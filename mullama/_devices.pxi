# ggml's compute devices: this machine's (devices()), and those of llama.cpp's RPC backend: a
# model's layers on `mullama rpc-server` processes of other machines (Model.load(path,
# rpc=[...])), and rpc_serve(), that server. The RPC protocol has no authentication: servers
# belong on a private network.

import socket as _socket

cdef extern from "_capped_device.h" nogil:
    ggml_backend_dev_t mullama_capped_device_new(ggml_backend_dev_t inner, size_t bytes)


RPC_CONNECT_TIMEOUT = 5.0    # seconds an RPC endpoint may take to accept a connection
_RPC_LOST_EARLIER = (
    "an RPC server stopped answering earlier in this process; llama.cpp's RPC client cannot "
    "reconnect, so models on RPC servers cannot be loaded or used again until the process restarts"
)


_DEVICE_TYPES = {GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
                 GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}


def devices():
    """This machine's compute devices as llama.cpp sees them: a list of dicts with ``name``,
    ``description``, ``type`` ("cpu", "gpu", "igpu" or "accel") and ``memory_total`` /
    ``memory_free`` in bytes. A GPU build on a machine without its GPU lists only the CPU.
    (``supports_gpu_offload()`` says whether offloading is possible at all, which RPC servers
    make true on any build.)"""
    cdef size_t i, free_b, total_b
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        ggml_backend_dev_memory(dev, &free_b, &total_b)
        out.append({"name": ggml_backend_dev_name(dev).decode(), "description": ggml_backend_dev_description(dev).decode(),
                    "type": _DEVICE_TYPES.get(ggml_backend_dev_get_type(dev), "other"),
                    "memory_total": total_b, "memory_free": free_b})
    return out


cdef tuple _parse_endpoint(object endpoint):
    """'host:port' -> (host, port), checked by name."""
    if not isinstance(endpoint, str):
        raise InvalidArgumentError(f"RPC endpoint {endpoint!r} must be a 'host:port' string")
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"RPC endpoint {endpoint!r} must be 'host:port' with a port in 1..65535")
    return host, int(port)


cdef list _rpc_endpoints(object rpc):
    if isinstance(rpc, str):
        rpc = [e for e in rpc.split(",") if e]
    try:
        endpoints = list(rpc)
    except TypeError:
        raise InvalidArgumentError("rpc must be a list of 'host:port' strings") from None
    if not endpoints:
        raise InvalidArgumentError("rpc is empty; give at least one 'host:port'")
    for e in endpoints:
        _parse_endpoint(e)
    if len(set(endpoints)) != len(endpoints):
        raise InvalidArgumentError(f"rpc lists an endpoint twice: {endpoints}")
    return endpoints


cdef int _probe(str endpoint, double timeout) except -1:
    """ModelLoadError naming the endpoint unless it accepts a connection within `timeout`:
    llama.cpp's RPC client aborts the process when it cannot connect."""
    host, port = _parse_endpoint(endpoint)
    try:
        _socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ModelLoadError(f"RPC server {endpoint} is unreachable: {exc.strerror or exc} "
                             f"(start it with: mullama rpc-server --host {host} --port {port})") from None
    return 0


cdef void _local_gpus(vector[ggml_backend_dev_t] & out):
    """Append this machine's GPUs (not RPC servers': they are never registered globally)."""
    cdef size_t i
    cdef ggml_backend_dev_t dev
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        if ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU:
            out.push_back(dev)


cdef int _rpc_devices(list endpoints, vector[ggml_backend_dev_t] & out) except -1:
    """The devices of these RPC servers, in order, then this machine's own GPUs, as llama.cpp
    orders them (remote first, to keep transfers few); NULL-terminated for llama_model_params."""
    cdef ggml_backend_reg_t reg
    cdef bytes b
    cdef const char * cb
    cdef size_t i
    for endpoint in endpoints:
        _probe(endpoint, RPC_CONNECT_TIMEOUT)
        b = endpoint.encode()
        cb = b
        with nogil:
            reg = ggml_backend_rpc_add_server(cb)
        if reg == NULL or ggml_backend_reg_dev_count(reg) == 0:
            raise ModelLoadError(f"RPC server {endpoint} offers no devices")
        for i in range(ggml_backend_reg_dev_count(reg)):
            out.push_back(ggml_backend_reg_dev_get(reg, i))
    _local_gpus(out)
    out.push_back(NULL)
    return 0


def rpc_serve(host="127.0.0.1", port=50052, *, n_threads=0, cache_dir=None, mem=None):
    """Serve this machine's compute (its GPUs, else its CPU) to llama.cpp RPC clients, such
    as ``Model.load(path, rpc=["host:port"])`` on another machine. Blocks for good; returns
    only by raising MullamaError when it cannot start (the port is taken, say).

    The protocol has no authentication or encryption: bind a private address only.
    ``cache_dir`` lets the server keep large tensors between runs (llama.cpp's ``-c``).
    ``mem`` (MiB) is the memory each device reports instead of its own: clients give
    servers layers in proportion to it."""
    _parse_endpoint(f"{host}:{port}")
    _check_int(n_threads, "n_threads", 0, 1024)
    if mem is not None:
        _check_int(mem, "mem", 1, 1 << 30)
    cdef vector[ggml_backend_dev_t] devs
    _local_gpus(devs)
    if devs.size() == 0:
        devs.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU))
    cdef size_t i
    if mem is not None:
        for i in range(devs.size()):
            devs[i] = mullama_capped_device_new(devs[i], <size_t> mem << 20)
    # Fail here, with a clear message, on an address the server could not listen on.
    with _socket.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET) as s:
        try:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as exc:
            raise MullamaError(f"the RPC server cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    cdef bytes endpoint = f"{host}:{port}".encode()
    cdef bytes cache = os.fsencode(cache_dir) if cache_dir is not None else b""
    cdef const char * ccache = <const char *> cache if cache_dir is not None else NULL
    cdef const char * cendpoint = endpoint
    cdef size_t threads = n_threads or _default_threads()
    with nogil:
        ggml_backend_rpc_start_server(cendpoint, ccache, threads, devs.size(), devs.data())
    raise MullamaError(f"the RPC server on {host}:{port} stopped: llama.cpp could not start or keep serving")
