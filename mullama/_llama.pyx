# cython: language_level=3
# distutils: language = c++
"""mullama's native core: Model, Context and EmbeddingGenerator over llama.cpp.

Split by concern into include files: _core.pxi (logging, errors, interrupts, helpers),
_devices.pxi (this machine's devices and RPC servers'), _model.pxi, _lora.pxi (adapters), _native.pxi (the one owner of a llama_context and its nogil decode layer), _sampling.pxi, _templates.pxi (chat templates through llama.cpp's chat layer), _context.pxi (the nogil generation loop), _embedding.pxi and _engine.pxi (continuous batching).
"""

include "_core.pxi"
include "_devices.pxi"
include "_model.pxi"
include "_lora.pxi"
include "_native.pxi"
include "_sampling.pxi"
include "_templates.pxi"
include "_context.pxi"
include "_embedding.pxi"
include "_engine.pxi"
