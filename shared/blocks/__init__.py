"""Layers shared by several projects, in timm's style: one concept a file (attention variants, MLPs, norms, embeddings).

Nothing is imported here, so `import shared.blocks.attention.window` pulls in only what it needs.
"""
