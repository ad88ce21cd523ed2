# SamplerParams -> a llama.cpp sampler chain. The chain is owned by the generation that made it.

cdef llama_sampler * _make_sampler(object params, int n_vocab, int n_ctx) except NULL:
    """Build a sampler chain; the caller frees it with llama_sampler_free."""
    params = SamplerParams.coerce(params)
    cdef llama_sampler_chain_params cp = llama_sampler_chain_default_params()
    cp.no_perf = True
    cdef llama_sampler * chain = llama_sampler_chain_init(cp)
    if chain == NULL:
        raise MemoryError("llama_sampler_chain_init failed")
    cdef uint32_t seed = <uint32_t> params.seed if params.seed != 0 else <uint32_t> LLAMA_DEFAULT_SEED
    if (params.penalty_repeat != 1.0 or params.penalty_freq != 0.0 or params.penalty_present != 0.0) \
            and params.penalty_last_n != 0:
        # llama.cpp allocates a window of penalty_last_n tokens: none can be older than n_ctx.
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
            n_vocab, min(params.penalty_last_n, n_ctx), params.penalty_repeat, params.penalty_freq, params.penalty_present))
    if params.temperature == 0:
        llama_sampler_chain_add(chain, llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(params.top_k))
    if params.typical_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_typical(params.typical_p, 1))
    if params.top_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(params.min_p, 1))
    llama_sampler_chain_add(chain, llama_sampler_init_temp(params.temperature))
    llama_sampler_chain_add(chain, llama_sampler_init_dist(seed))
    return chain
