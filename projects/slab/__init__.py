"""SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization (Guo, Chen, Tang, Wang; ICML 2024). https://arxiv.org/abs/2405.11582"""
