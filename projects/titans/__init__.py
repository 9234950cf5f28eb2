"""Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni; arXiv 2501.00663, 2025).

https://arxiv.org/abs/2501.00663. The neural long-term memory (LMM) with momentum and forgetting, its chunked
parallel training, and the three ways of combining it with attention (MAC, MAG, MAL), next to a Transformer++
baseline. See README.md.
"""
