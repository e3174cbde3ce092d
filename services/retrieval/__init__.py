"""Retrieval: the vector store (Milvus through pymilvus), one row per (item, object)."""
