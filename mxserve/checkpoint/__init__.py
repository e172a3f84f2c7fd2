"""HF-directory checkpoints: a lazy reader that dequantizes mxmoe tensors on request, an atomic sharded writer,
and conversion between hub tensor names and transformers' in-memory (fused-expert) layout."""
from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.checkpoint.writer import AtomicCheckpointWriter

__all__ = ["HFCheckpoint", "AtomicCheckpointWriter"]
