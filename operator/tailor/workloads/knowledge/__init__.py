"""The knowledge-base program (``python -m tailor.workloads.knowledge.index``): documents, chunking,
embedding into the vector store, the retriever the gateway uses, and embedding adaptation."""
