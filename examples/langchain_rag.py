"""Retrieval-augmented generation with LangChain and a local MoE model, streamed.

An in-memory vector store retrieves context, a chat prompt frames it, `ChatMoeLLM`
answers token by token. Offline by default: the embedded demo model (a tiny
random-weight model if none is shipped, whose answer is noise; the pipeline is real)
and a deterministic fake embedding. For real use pass --model and swap in a real
embedding model.

    python examples/langchain_rag.py --model /models/Mixtral-8x7B-Instruct-v0.1 --experts-bits 2
"""

import argparse

from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_moe_llm import ChatMoeLLM

from moe_llm.defaults import default_model_dir

DOCS = [
    "Mixtral-8x7B has 8 experts per layer and routes every token to 2 of them.",
    "moe-llm keeps every expert in pinned host RAM and copies it to the GPU on a cache miss.",
    "An LRU cache of expert slots on the GPU exploits that adjacent tokens reuse experts.",
    "The next layer's router, applied to the current hidden state, guesses which experts to prefetch.",
    "Attention weights are quantized to 4 bits, experts to 2, 3 or 4 bits with HQQ.",
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
parser.add_argument("--question", default="Where do the experts live, and how do they reach the GPU?")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
parser.add_argument("--experts-bits", type=int, default=None, help="2, 3 or 4 (default: checkpoint precision)")
args = parser.parse_args()

store = InMemoryVectorStore.from_texts(DOCS, DeterministicFakeEmbedding(size=16))
retriever = store.as_retriever(search_kwargs={"k": 2})

prompt = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only this context:\n{context}"),
        ("human", "{question}"),
    ]
)
chat = ChatMoeLLM(
    model_path=str(args.model or default_model_dir()[0]),
    device=args.device,
    experts_bits=args.experts_bits,
    max_tokens=args.max_tokens,
)


def join_docs(docs) -> str:
    return "\n".join(f"- {d.page_content}" for d in docs)


chain = {"context": retriever | join_docs, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()

print(f"Q: {args.question}\nA: ", end="", flush=True)
for piece in chain.stream(args.question):
    print(piece, end="", flush=True)
print()
