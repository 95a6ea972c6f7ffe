"""The Context Session Store: cross-bot data and conversation ownership, backed by etcd."""
