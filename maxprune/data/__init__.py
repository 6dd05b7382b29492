"""Data: text sources -> tokenizer -> fixed-length packed sequences -> disjoint token budgets.

`sources` turns a spec string into documents, `tokenizer` into ids, `prepare`
writes the packed stream once (ArrayRecord + manifest.json; its steps in
`staging`, `packing`, `shards`, `pool`), `prepared` opens it for random access,
`budgets` cuts that stream into named, checkably disjoint ranges.
The `prepare` function stays in its module (`from maxprune.data.prepare import
prepare`) so that `maxprune.data.prepare` always names the module.
"""

from maxprune.data.budgets import Budgets, Plan, TokenRange, parse_budgets, parse_tokens
from maxprune.data.prepare import Manifest, PreparedDataset, open_prepared
from maxprune.data.sources import (Document, FileStats, SourceSpec, iter_documents, iter_file, list_files,
                                   parse_source)
from maxprune.data.tokenizer import Tokenizer, train_bpe

__all__ = [
    "Budgets", "Document", "FileStats", "Manifest", "Plan", "PreparedDataset", "SourceSpec", "TokenRange",
    "Tokenizer", "iter_documents", "iter_file", "list_files", "open_prepared", "parse_budgets",
    "parse_source", "parse_tokens", "train_bpe",
]
