"""HAT: Hybrid Attention Transformer for image super-resolution and restoration.

Chen, Wang, Zhou, Qiao, Dong. "Activating More Pixels in Image Super-Resolution Transformer", CVPR 2023
(https://arxiv.org/abs/2205.04437); extended in "HAT: Hybrid Attention Transformer for Image Restoration"
(https://arxiv.org/abs/2309.05239). Official code: https://github.com/XPixelGroup/HAT
"""
