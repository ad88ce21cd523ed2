# Logging, error mapping, interrupt polling and small helpers shared by the native classes.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdio cimport fflush, fprintf, stderr
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.unistd cimport close, getpid
from libcpp.string cimport string
from libcpp.vector cimport vector

from mullama._llama cimport *

import atexit
import collections
import logging
import math
import os
import threading

from ._errors import (
    ChatTemplateError,
    ClosedError,
    ContextBusyError,
    ContextCreateError,
    ContextOverflowError,
    DecodeError,
    EmbeddingsDisabledError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
    MullamaError,
    StateError,
    AdapterError,
    decode_failure,
)
from . import _state
from ._params import SamplerParams


cdef extern from "_support.h" nogil:
    int mullama_atomic_load(const int * p)
    void mullama_atomic_store(int * p, int v)
    size_t mullama_utf8_complete(const char * s, size_t n)
    ctypedef struct mullama_file_guard:
        int fd
        long long size
        long long mtime_ns
    int mullama_file_changed(const mullama_file_guard * g)
    int mullama_decode_aborted()
    int mullama_logits_fresh(const float * row)
    void mullama_logits_used(float * row)
    void mullama_set_decode_aborted(int v)
    int mullama_set_thread_slice(uint64_t ns)


cdef extern from "_rpc_watch.h" nogil:
    int mullama_rpc_lost()
    void mullama_rpc_park_if_lost(const char * message)
    int mullama_decode_watched(llama_context * ctx, llama_batch batch, int * rc)


from cpython.exc cimport PyErr_CheckSignals


# ---------------------------------------------------------------------------------------------
# llama.cpp's log -> Python logging (logger "mullama"), silent unless the user configures it.

logger = logging.getLogger("mullama")
logger.addHandler(logging.NullHandler())

# The last lines llama.cpp logged, so a failed load or context can say why.
_recent_log = collections.deque(maxlen=64)
_log_partial = []
cdef int _log_enabled = 0

_LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}
_last_level = [logging.INFO]


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    if not mullama_atomic_load(&_log_enabled):
        return
    with gil:
        try:
            _handle_log(<int>level, text.decode("utf-8", "replace"), mullama_decode_aborted())
        except BaseException:
            pass


_log_seq = [0]


def _handle_log(int level, str text, bint aborting=False):
    if level != GGML_LOG_LEVEL_CONT:
        # A decode that mullama aborted (cancel, Ctrl-C) makes llama.cpp log errors on its way
        # out; they are what was asked for, so they go to DEBUG.
        _last_level[0] = logging.DEBUG if aborting else _LEVELS.get(level, logging.DEBUG)
    _log_partial.append(text)
    if not text.endswith("\n"):
        return
    line = "".join(_log_partial).rstrip()
    _log_partial.clear()
    if not line:
        return
    lvl = _last_level[0]
    _log_seq[0] += 1
    _recent_log.append((_log_seq[0], lvl, line))
    logger.log(lvl, "%s", line)


def _log_mark():
    """A position in llama.cpp's log; _log_since(mark) gives the lines logged after it."""
    return _log_seq[0]


def _log_since(mark, int min_level=logging.WARNING):
    return [line for seq, lvl, line in list(_recent_log) if seq > mark and lvl >= min_level]


def _stop_logging():
    mullama_atomic_store(&_log_enabled, 0)


mullama_atomic_store(&_log_enabled, 1)
llama_log_set(_log_callback, NULL)


cdef void _on_ggml_abort(const char * message) noexcept nogil:
    # An RPC server lost during a watched decode parks this thread instead (_rpc_watch.h).
    mullama_rpc_park_if_lost(message)
    # ggml is about to end the process (one of its own checks failed): say so in one line
    # rather than through a debugger's backtrace.
    fprintf(stderr, b"mullama: llama.cpp ended the process: %s\n", message)
    fflush(stderr)


ggml_set_abort_callback(_on_ggml_abort)
atexit.register(_stop_logging)

llama_backend_init()


# ---------------------------------------------------------------------------------------------
# Interrupts: a C flag another thread can set (cancel), and SIGINT polled at most every 20 ms.

cdef struct Interrupt:
    int cancel            # set by cancel() from any thread
    int check_signals     # poll Python signal handlers (the calling thread is the main thread)
    int64_t last_poll_us
    int interrupted       # a signal handler raised; the exception is in exc
    PyObject * exc


cdef cbool _poll_interrupt(void * data) noexcept nogil:
    """Polled by the abort callback and between tokens. Cheap unless a poll is due."""
    cdef Interrupt * it = <Interrupt *> data
    cdef int64_t now
    if mullama_atomic_load(&it.cancel) or it.interrupted:
        return True
    if it.check_signals:
        now = ggml_time_us()
        if now - it.last_poll_us >= 20000:
            it.last_poll_us = now
            with gil:
                _poll_signals(it)
    return it.interrupted != 0


cdef cbool _abort_callback(void * data) noexcept nogil:
    """The abort callback of every context, called by ggml in the thread running llama_decode."""
    if _poll_interrupt(data):
        mullama_set_decode_aborted(1)
        return True
    return False


cdef void _poll_signals(Interrupt * it) noexcept:
    try:
        PyErr_CheckSignals()
    except BaseException as exc:
        Py_INCREF(exc)
        it.exc = <PyObject *> exc
        it.interrupted = 1


cdef inline void _arm_signals(Interrupt * it):
    """Ready the signal polling for a native loop run by the calling thread. A cancel already
    asked for stays: it belongs to the generation, not to one stretch of its loop."""
    it.interrupted = 0
    it.exc = NULL
    it.last_poll_us = 0
    # PyErr_CheckSignals does nothing off the main thread: other threads never take the GIL for it.
    it.check_signals = threading.current_thread() is threading.main_thread()


cdef inline void _arm_interrupt(Interrupt * it, bint cancelled):
    """Ready the interrupt for a new generation: cancelled already if a cancel() covers it."""
    mullama_atomic_store(&it.cancel, 1 if cancelled else 0)
    _arm_signals(it)


cdef int _raise_interrupt(Interrupt * it) except -1:
    """After a native loop: re-raise what a signal handler raised, or report a cancel."""
    cdef PyObject * exc = it.exc
    it.exc = NULL
    if it.interrupted and exc != NULL:
        it.interrupted = 0
        obj = <object> exc
        Py_XDECREF(exc)
        raise obj
    if mullama_atomic_load(&it.cancel):
        it.cancel = 0
        raise GenerationCancelled("generation was cancelled")
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers

cdef bytes _utf8(object text, str what):
    """The UTF-8 bytes of a str or of a str subclass (numpy.str_, StrEnum: their own methods are
    not asked)."""
    try:
        return str.encode(text, "utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{what} is not valid Unicode text ({exc.reason} at index {exc.start}); "
            "remove lone surrogates or encode with errors='replace' first"
        ) from None


cdef int _check_int(object value, str name, long lo, long hi) except? -1:
    """value as a C int, if it is an integer (numpy's included, bool not) within [lo, hi]."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidArgumentError(f"{name} must be an int, got {value!r}")
    value = value.__index__()
    if value < lo or value > hi:
        raise InvalidArgumentError(f"{name}={value!r} is out of range [{lo}, {hi}]")
    return value


cdef int _default_threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _yield_to_waking_threads():
    """Let threads that wake up (an event loop's) preempt the native loop of the calling thread
    at once, without lowering its share of the CPU: see mullama_set_thread_slice. For threads
    mullama starts; it lasts as long as the thread."""
    return mullama_set_thread_slice(20000000) == 0


def backend_init():
    """Initialise llama.cpp's backends. Done on import; calling it again is harmless."""
    llama_backend_init()


def backend_free():
    """Release llama.cpp's global backend state (optional, at the end of a program)."""
    llama_backend_free()


def supports_gpu_offload():
    """True when this build can offload layers: a GPU backend (built with GGML_CUDA=1) or the
    RPC backend, which every build has. ``devices()`` lists the GPUs actually present."""
    return bool(llama_supports_gpu_offload())


def supports_mmap():
    return bool(llama_supports_mmap())


def supports_mlock():
    return bool(llama_supports_mlock())


def _has_amx_int8():
    """Whether this build has ggml's AMX int8 kernels (built for a CPU that has AMX)."""
    return bool(ggml_cpu_has_amx_int8())


def system_info():
    """llama.cpp's description of the CPU features and backends this build uses."""
    return llama_print_system_info().decode("utf-8", "replace")


def max_devices():
    """The most devices a model can be split across in this build."""
    return int(llama_max_devices())


def version():
    """The llama.cpp version this extension was built from."""
    return llama_version().decode("utf-8", "replace")
