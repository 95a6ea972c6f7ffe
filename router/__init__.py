"""The router: participants from etcd, a FAISS index of their intents, the Match service."""
