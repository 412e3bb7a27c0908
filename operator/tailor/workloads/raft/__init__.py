"""The RAFT programs: training data in the paper's recipe (``python -m tailor.workloads.raft.data``)
and the RAG-vs-RAFT evaluation stage (``python -m tailor.workloads.raft.evaluate``)."""
