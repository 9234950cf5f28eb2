"""ByteTransformer: A High-Performance Transformer Boosted for Variable-Length Inputs.

Yujia Zhai, Chengquan Jiang, Leyuan Wang, Xiaoying Jia, Shang Zhang, Zizhong Chen, Xin Liu, Yibo Zhu (IEEE IPDPS
2023), https://arxiv.org/abs/2210.03052; code: https://github.com/bytedance/ByteTransformer.
A padding-free BERT: the tokens of a padded batch are packed once, every layer runs on them alone, with fused
variable-length attention and fused add-bias + residual + LayerNorm.
"""
