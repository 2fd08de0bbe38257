"""EPLB on each rank: the per-step protocol and decisions (``state``) and the async rebalance
(``async_rebalance``). It calls the balancer (pure placement logic) and the transfer primitives in
``eplb.parallel``; nothing calls back into it except the rank loop."""
