"""Data every project can use: resumable, rank-sharded loaders, the datasets that ship inside PyPI wheels,
an ImageNet-layout folder reader, and common transforms. Import submodules directly."""
