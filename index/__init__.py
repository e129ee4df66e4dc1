"""Course material and Q&A data, chunking, embedding, FAISS persistence and retrieval."""

from index.qa import QARecord, dedupe, load_qa, split_records
from index.retriever import Passage, Retriever

__all__ = ["QARecord", "load_qa", "dedupe", "split_records", "Retriever", "Passage"]
