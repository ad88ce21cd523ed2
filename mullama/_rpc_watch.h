/* Decodes of a model spread over RPC servers, watched so that a server's death ends the
   generation with an error instead of the process.

   When a server goes away mid-computation, llama.cpp's RPC client (the pinned release) calls
   GGML_ABORT in its dispatcher thread, and the thread that asked for the computation waits on
   an answer that will never come (ggml-org/llama.cpp#25938). So such a decode runs on a helper
   thread while its caller watches. mullama's ggml abort callback, seeing the RPC client's
   message while a caller watches, marks the process's RPC devices lost, wakes the watchers and
   parks the dispatcher for good instead of returning into abort(). Each watcher gives up on its
   helper (left waiting, with the context it uses) and reports the loss. From then on nothing
   may touch the lost model's native state: every further call on it would wait on the parked
   dispatcher, so contexts and models of RPC devices refuse work and are never freed. */
#ifndef MULLAMA_RPC_WATCH_H
#define MULLAMA_RPC_WATCH_H

#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "llama.h"

struct mullama_rpc_watch_state {
    std::mutex mu;
    std::condition_variable cv;
    bool lost = false;
    int watching = 0;     /* callers waiting on a helper's decode */
};

/* Never destroyed: parked threads hold its mutex's waiters until the process ends. */
static inline mullama_rpc_watch_state & mullama_rpc_watch() {
    static mullama_rpc_watch_state * w = new mullama_rpc_watch_state;
    return *w;
}

static inline int mullama_rpc_lost(void) {
    mullama_rpc_watch_state & w = mullama_rpc_watch();
    std::lock_guard<std::mutex> lk(w.mu);
    return w.lost;
}

/* From ggml's abort callback. Returns only when the abort is not an RPC connection's failure
   during a watched decode (the process then ends as ggml intends); otherwise the calling thread
   (the RPC dispatcher) is parked for good. */
static inline void mullama_rpc_park_if_lost(const char * message) {
    if (message == nullptr || std::strstr(message, "Remote RPC server") == nullptr) return;
    mullama_rpc_watch_state & w = mullama_rpc_watch();
    std::unique_lock<std::mutex> lk(w.mu);
    if (w.watching == 0 && !w.lost) return;
    w.lost = true;
    w.cv.notify_all();
    for (;;) w.cv.wait(lk);
}

struct mullama_watched_decode {
    llama_context * ctx;
    llama_batch batch;
    int rc = 0;
    bool done = false;
};

/* llama_decode on a helper thread, and the wait for its outputs (llama_synchronize), so that
   reading the logits afterwards asks nothing of the servers. Returns 0 with *rc set to
   llama_decode's result, or -1 when the RPC devices are (or become) lost. */
static inline int mullama_decode_watched(llama_context * ctx, llama_batch batch, int * rc) {
    mullama_rpc_watch_state & w = mullama_rpc_watch();
    auto job = std::make_shared<mullama_watched_decode>();
    job->ctx = ctx;
    job->batch = batch;
    std::unique_lock<std::mutex> lk(w.mu);
    if (w.lost) return -1;
    std::thread helper;
    try {
        helper = std::thread([job]() {
            const int r = llama_decode(job->ctx, job->batch);
            llama_synchronize(job->ctx);
            mullama_rpc_watch_state & ws = mullama_rpc_watch();
            std::lock_guard<std::mutex> g(ws.mu);
            job->rc = r;
            job->done = true;
            ws.cv.notify_all();
        });
    } catch (const std::exception &) {
        *rc = -3;   /* no thread to run it on: a failed decode */
        return 0;
    }
    w.watching++;
    w.cv.wait(lk, [&] { return job->done || w.lost; });
    w.watching--;
    const bool done = job->done;
    lk.unlock();
    if (!done) {
        helper.detach();   /* waits for good on the parked dispatcher; job keeps its data */
        return -1;
    }
    helper.join();
    *rc = job->rc;
    return 0;
}

#endif
