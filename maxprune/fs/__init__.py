"""Files that are never seen half-written: `atomic` (write-then-rename files), `staged` (output dirs built in
a hidden sibling and swapped in), `locks` (one writer per dir), `integrity` (manifests of sha256 hashes)."""
