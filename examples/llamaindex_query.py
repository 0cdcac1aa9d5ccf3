"""A LlamaIndex query engine over a local MoE model, with a streamed answer and token counts.

Documents go into a `VectorStoreIndex`; the query engine retrieves the closest
chunks and `MoeLLM` answers through the model's chat template. Offline by
default: the embedded demo model (a tiny random-weight model if none is shipped,
whose answer is noise; the pipeline is real) and a mock embedding. For real use
pass --model and set a real embedding model.

    python examples/llamaindex_query.py --model /models/Mixtral-8x7B-Instruct-v0.1 --experts-bits 2
"""

import argparse

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.llms.moe_llm import MoeLLM

from moe_llm.defaults import default_model_dir

DOCS = [
    "Mixtral-8x7B has 8 experts per layer and routes every token to 2 of them.",
    "moe-llm keeps every expert in pinned host RAM and copies it to the GPU on a cache miss.",
    "An LRU cache of expert slots on the GPU exploits that adjacent tokens reuse experts.",
    "The next layer's router, applied to the current hidden state, guesses which experts to prefetch.",
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
parser.add_argument("--question", default="How does moe-llm decide which experts to copy early?")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
parser.add_argument("--experts-bits", type=int, default=None, help="2, 3 or 4 (default: checkpoint precision)")
args = parser.parse_args()

llm = MoeLLM(
    model_path=str(args.model or default_model_dir()[0]),
    device=args.device,
    experts_bits=args.experts_bits,
    max_new_tokens=args.max_tokens,
)
counter = TokenCountingHandler(tokenizer=llm.engine.tokenizer.encode)  # count with the model's own tokenizer
Settings.llm = llm
Settings.embed_model = MockEmbedding(embed_dim=8)
Settings.callback_manager = CallbackManager([counter])

index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])
engine = index.as_query_engine(streaming=True, similarity_top_k=2)

print(f"Q: {args.question}\nA: ", end="", flush=True)
response = engine.query(args.question)
for piece in response.response_gen:
    print(piece, end="", flush=True)
print(
    f"\n[{len(response.source_nodes)} sources; tokens: {counter.prompt_llm_token_count} prompt, "
    f"{counter.completion_llm_token_count} completion]"
)
