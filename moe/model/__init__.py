"""The model: typed configs, routers, experts, the MoE layer, the transformer, and their exact
parameter/FLOP accounting. Imports only torch; expert parallelism is handed in (moe.parallel.ep)."""
