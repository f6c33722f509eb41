"""Data: pretraining token shards and their resumable loader; SFT conversations packed with loss masks."""

from nanoseek.data.pretrain import (PretrainLoader, build_shards, check_tokenizer, document_ids, find_inputs,
                                    open_split, read_documents, read_meta, write_shards)
from nanoseek.data.sft import IGNORE_INDEX, SFTDataset, load_conversations

__all__ = ["PretrainLoader", "build_shards", "check_tokenizer", "document_ids", "find_inputs", "open_split",
           "read_documents", "read_meta", "write_shards", "IGNORE_INDEX", "SFTDataset", "load_conversations"]
