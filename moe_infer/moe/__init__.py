"""The served MoE layer: what stands in the model's place of its reference MoELayer, one step per module
(the diagram: layer.py).

    router     moe_infer.model.moe.Router: the K experts of each token and their weights
    dispatch   dispatch/: DynamicDispatch (sort, count, variable all-to-all), StaticDispatch (capacity, padding),
               and their all-to-all over the expert-parallel group (exchange.py)
    experts    experts.py: LocalExperts (every local expert resident) run by ExpertKernel; the runtime may give a
               layer another store (moe_infer.buffering.store.BufferedExperts)
    combine    dispatch/ again: the outputs back to their tokens, each token's K outputs summed
    layer.py   ServedMoELayer (router -> dispatch -> experts -> combine), PeerMoELayer, build_moe_layer
    stats.py   MoEStats: one call's figures, filled in alike by our layer and the peers
    baselines/ the peers: DeepSpeed's MoE layer, megatron-core's MoELayer
"""
