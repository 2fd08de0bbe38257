"""eplb: MoE serving with data parallelism, expert parallelism and asynchronous EPLB."""

__version__ = "0.1.0"
