"""EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention.

Xinyu Liu, Houwen Peng, Ningxin Zheng, Yuqing Yang, Han Hu, Yixuan Yuan. CVPR 2023.
https://arxiv.org/abs/2305.07027 (official code: https://github.com/microsoft/Cream/tree/main/EfficientViT)
"""
