"""Data: text sources -> tokenizer -> fixed-length packed sequences -> disjoint token budgets.

`sources` turns a spec string into documents, `tokenizer` into ids, `prepare`
writes the packed stream once (ArrayRecord + manifest.json; its steps in
`staging`, `packing`, `shards`, `pool`), `prepared` opens it for random access,
`budgets` cuts that stream into named, checkably disjoint ranges.
"""
