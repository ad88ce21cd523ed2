/* A compute device that reports a memory size of the user's choosing (`mullama rpc-server
   --mem`): RPC clients spread a model's layers over servers in proportion to the memory each
   reports, so this sets a server's share. Everything else is the wrapped device's own. */
#ifndef MULLAMA_CAPPED_DEVICE_H
#define MULLAMA_CAPPED_DEVICE_H

#include "ggml-backend-impl.h"

struct mullama_capped_device {
    ggml_backend_device dev;       /* first: ggml reads this one */
    ggml_backend_dev_t inner;
    size_t bytes;
};

static void mullama_capped_memory(ggml_backend_dev_t dev, size_t * free, size_t * total) {
    *free = *total = ((mullama_capped_device *) dev)->bytes;
}

static void mullama_capped_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    mullama_capped_device * c = (mullama_capped_device *) dev;
    c->inner->iface.get_props(c->inner, props);
    props->memory_free = props->memory_total = c->bytes;
}

/* The backend is the wrapped device's, pointed at the wrapper: the RPC server asks a backend's
   device for its memory. */
static ggml_backend_t mullama_capped_init(ggml_backend_dev_t dev, const char * params) {
    mullama_capped_device * c = (mullama_capped_device *) dev;
    ggml_backend_t backend = c->inner->iface.init_backend(c->inner, params);
    if (backend != nullptr) backend->device = dev;
    return backend;
}

/* Lives as long as the process: the server that uses it never returns. */
static inline ggml_backend_dev_t mullama_capped_device_new(ggml_backend_dev_t inner, size_t bytes) {
    mullama_capped_device * c = new mullama_capped_device;
    c->dev = *inner;
    c->dev.iface.get_memory = mullama_capped_memory;
    c->dev.iface.get_props = mullama_capped_props;
    c->dev.iface.init_backend = mullama_capped_init;
    c->inner = inner;
    c->bytes = bytes;
    return &c->dev;
}

#endif
