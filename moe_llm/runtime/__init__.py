"""The runtime of a loaded model: the engine and its batcher (`engine`, `batching`, `prefill`,
`prefix_cache`, `sequence`), decode (`decode_graph` for CUDA graphs, `fused_decode` for batched
rows, `sampling`, `textstream`), the trunk's quantized layers (`quant_linear`) and the counters
(`stats`). The experts runtime it drives is `moe_llm.experts`."""
