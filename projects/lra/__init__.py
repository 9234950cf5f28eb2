"""Long Range Arena: A Benchmark for Efficient Transformers (Tay, Dehghani, Abnar, Shen, Bahri, Pham, Rao, Yang,
Ruder, Metzler; ICLR 2021). https://arxiv.org/abs/2011.04006 — code: https://github.com/google-research/long-range-arena
"""
